"""Run a stage on this machine under torchrun.

torchrun starts in its own session, so a Ctrl-C in the terminal reaches the
driver only; the driver forwards one SIGTERM, torchrun forwards it to every rank,
and the ranks finish their step, checkpoint and exit 75. A second Ctrl-C kills.
If the driver itself dies, the kernel sends torchrun SIGTERM (PR_SET_PDEATHSIG),
so no stage trains on without a driver to record it.

The terminal gets the driver's view of the stage (launcher/watch.py reads rank 0's
stdout log and metrics.jsonl) and the driver's own lines. torchrun's
stderr (its warnings, and the ChildFailedError traceback it prints for any rank
that exits non-zero, even a stage's exit 2 with its one-line reason) goes to
TORCHRUN_LOG in the attempt's log folder; the driver tells what happened and, for
a crash, shows the end of rank 0's stderr (`attempts.error_tail`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# how long torchrun waits for ranks to checkpoint after a signal before it kills them
SHUTDOWN_TIMEOUT_S = 600
PR_SET_PDEATHSIG = 1
TORCHRUN_LOG = "torchrun.log"  # in the attempt's log folder: the stderr of torchrun (and, under Slurm, srun)


class LocalBackend:
    name = "local"
    stop_signal = signal.SIGTERM  # what the driver sends its child to ask for checkpoint-and-exit

    def command(self, kind: str, spec_path: Path, nproc_per_node: int, log_dir: Path, nnodes: int = 1) -> list[str]:
        assert nnodes == 1, "the local back-end runs one node"
        return torchrun(["--standalone", "--nnodes", "1"], kind, spec_path, nproc_per_node, log_dir)

    def launch(self, argv: list[str]) -> tuple[int, bool]:
        """Run `argv` to the end; return (exit code, whether a signal asked it to stop)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several ranks, without its banner
        log = _launcher_log(argv)
        with open(log, "ab") if log else contextlib.nullcontext() as stderr:
            proc = subprocess.Popen(argv, env=env, stderr=stderr, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        interrupted = False

        def forward(signum: int, _frame: object) -> None:
            nonlocal interrupted
            if interrupted:  # asked twice: stop waiting for the checkpoint
                print("baton: second signal, killing the stage", file=sys.stderr, flush=True)
                _kill_tree(proc.pid)
                return
            interrupted = True
            print(f"baton: {signal.Signals(signum).name}: asking the stage to checkpoint and stop "
                  "(again to kill)", file=sys.stderr, flush=True)
            proc.send_signal(self.stop_signal)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        try:
            return proc.wait(), interrupted
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def torchrun(rendezvous: list[str], kind: str, spec_path: Path, nproc_per_node: int, log_dir: Path) -> list[str]:
    """The torchrun command of a stage, given how its nodes meet."""
    return [
        sys.executable, "-m", "torch.distributed.run", *rendezvous,
        "--nproc-per-node", str(nproc_per_node), "--max-restarts", "0",
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
        # every rank's stdout and stderr go to log_dir only; the driver shows rank 0's stdout and progress from
        # there (launcher/watch.py), while library warnings and weight-loading reports stay in the logs (a failure
        # shows their tail)
        "--log-dir", str(log_dir), "--redirects", "3",
        "-m", f"stages.{kind}", "--spec", str(spec_path),
    ]


def link_logs(log_dir: Path) -> Path | None:
    """After an attempt: stable names for the logs torchrun wrote under its run id and a random suffix
    (`<log_dir>/<run id>_<random>/attempt_<restart>/<local rank>/stdout.log`): `rank-<r>.stdout` and
    `rank-<r>.stderr` in `log_dir`, relative links (the run folder may move). On several nodes (a folder per
    node, which the names do not tell apart) only rank 0's, found as the one local rank 0 that printed (only
    the global rank 0 prints). Returns rank 0's stderr, or None where torchrun wrote no rank's logs."""
    nodes = [max(agent.glob("attempt_*"), key=lambda a: int(a.name.removeprefix("attempt_") or 0))
             for agent in sorted(log_dir.glob("*_*")) if any(agent.glob("attempt_*/0/stderr.log"))]
    if not nodes:
        return None
    if len(nodes) == 1:
        ranks = {int(r.name): r for r in nodes[0].iterdir() if r.name.isdigit()}
    else:
        ranks = {0: next((n / "0" for n in nodes if _size(n / "0" / "stdout.log")), nodes[0] / "0")}
    for rank, folder in ranks.items():
        for stream in ("stdout", "stderr"):
            link = log_dir / f"rank-{rank}.{stream}"
            try:
                link.unlink(missing_ok=True)
                link.symlink_to((folder / f"{stream}.log").relative_to(log_dir))
            except OSError:
                continue  # a file system without links: the logs stay where torchrun put them
    return log_dir / "rank-0.stderr"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _launcher_log(argv: list[str]) -> Path | None:
    """Where the stderr of the command (torchrun's, srun's) goes: TORCHRUN_LOG beside the ranks' logs."""
    if "--log-dir" not in argv:
        return None
    folder = Path(argv[argv.index("--log-dir") + 1])
    folder.mkdir(parents=True, exist_ok=True)
    return folder / TORCHRUN_LOG


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the driver dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its ranks (each rank runs in a session of its own)."""
    try:
        import psutil  # a dependency of deepspeed, present wherever stages run
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    except Exception:
        procs = []
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass
    if not procs:
        os.kill(pid, signal.SIGKILL)
