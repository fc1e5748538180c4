"""Run a stage's ranks as processes forked from one warm process, instead of under torchrun.

Every torchrun launch pays for its agent and, in each rank, for importing torch, DeepSpeed and transformers
(about 10 s of a core per rank here). A forkserver that imports them once forks the ranks of every later
launch already warm; each rank then runs `python -m stages.<kind> --spec …` as torchrun would start it: the
same environment variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), the same module run as
`__main__`, the real DeepSpeed engine on gloo. What torchrun itself does (its agent, signal forwarding,
restarts) is proven by the end-to-end tier (`baton run` under torchrun, stopped and killed) and by
`tests/stages/test_stages.py::test_forked_ranks_train_as_torchrun_does`.

The warm process imports modules only; it never runs a torch operation, so no thread pool exists to be
copied into a fork.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import socket
import sys
import time
from pathlib import Path

from contract.kinds import KINDS

# what a stage imports, lazily included (transformers loads a model's module on first use)
PRELOAD = ["torch", "deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage3",
           "deepspeed.runtime.zero.stage_1_and_2", "transformers", "transformers.models.bert.modeling_bert",
           "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama", "datasets",
           "peft", *(f"stages.{kind}" for kind in KINDS)]

_context: multiprocessing.context.ForkServerContext | None = None


def context() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the forkserver inherits it: DeepSpeed reads it at import
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _rank(kind: str, spec_path: str, env: dict[str, str], out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(f, fd)
        os.close(f)
    import torch

    if "OMP_NUM_THREADS" in env:  # the pool's size was read at import, in the forkserver
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [f"stages/{kind}.py", "--spec", spec_path]
    runpy.run_module(f"stages.{kind}", run_name="__main__", alter_sys=True)  # ends in os._exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ranks:
    """The forked ranks of one stage launch."""

    def __init__(self, kind: str, spec_path: Path, world_size: int, env: dict[str, str], logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.logs, self.world_size, self.procs = logs, world_size, []
        port = free_port()
        threads = {"OMP_NUM_THREADS": "1"} if world_size > 1 and "OMP_NUM_THREADS" not in env else {}  # as torchrun
        for rank in range(world_size):
            rank_env = env | threads | {
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}
            out, err = logs / f"rank{rank}.out", logs / f"rank{rank}.err"
            for path in (out, err):
                path.unlink(missing_ok=True)
            proc = context().Process(target=_rank, args=(kind, str(spec_path), rank_env, str(out), str(err)))
            proc.start()
            self.procs.append(proc)

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        """SIGKILL every rank at once, as a crashed machine would, and reap them."""
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join()

    def wait(self, timeout: float) -> int:
        """0 when every rank exited 0, else the first failing rank's code; once one rank fails the others get
        30 s to follow before they are killed (torchrun's agent does the same); -9 past `timeout`."""
        deadline, failed_at, code = time.monotonic() + timeout, None, 0
        while self.alive():
            now = time.monotonic()
            if code == 0 and (bad := next((p.exitcode for p in self.procs if p.exitcode not in (None, 0)), None)):
                code, failed_at = bad, now
            if now > deadline or (failed_at is not None and now > failed_at + 30):
                self.kill()
                return code or -9
            time.sleep(0.05)
        return code or next((p.exitcode for p in self.procs if p.exitcode != 0), 0)

    def output(self, stream: str) -> str:
        """Every rank's stdout (`out`) or stderr (`err`), in rank order; a rank that died before it opened its
        files wrote none."""
        paths = (self.logs / f"rank{r}.{stream}" for r in range(self.world_size))
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())


def run(kind: str, spec_path: Path, world_size: int, env: dict[str, str], logs: Path,
        timeout: float) -> tuple[int, str, str]:
    """Run the stage's ranks to their end: (exit code, stdout, stderr), as `Ranks.wait` and `Ranks.output`."""
    ranks = Ranks(kind, spec_path, world_size, env, logs)
    code = ranks.wait(timeout)
    return code, ranks.output("out"), ranks.output("err")
