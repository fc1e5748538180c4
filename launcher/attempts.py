"""One attempt at one stage: write its spec, launch it with a back-end, record what happened in the ledger.

Used by the driver (`baton run`) and by a Slurm job (`baton job`) alike.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import importlib.metadata
import platform
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from contract.files import short, write_atomic
from contract.layout import (
    EXIT_BAD_INPUT,
    EXIT_STOPPED,
    ChangedInput,
    Result,
    complete_tags,
    final_dir,
    keep_when_done,
    read_bad_input,
    read_metrics,
    read_result,
    resumable,
    stage_dir,
    step_of,
    tag_of,
)
from contract.spec import Ref, Spec
from launcher import ledger
from launcher.backends import Backend
from launcher.backends.local import TORCHRUN_LOG, link_logs
from launcher.digests import folder_stat
from launcher.errors import LedgerError
from launcher.plan import Step, world_size_change
from launcher.resolve import Resolved, settings
from launcher.watch import Watch

PREVIOUS = "previous"  # <stage>/previous/: the output a new attempt replaces, until that attempt passes its checks
KEPT = ("slurm", PREVIOUS)  # what starting over leaves in place (Slurm's logs stay)
# the packages whose versions an attempt records (read from their metadata: the launcher never imports torch)
PACKAGES = ("baton", "torch", "deepspeed", "transformers", "datasets")


def run_stage(step: Step, led: ledger.Ledger, run_dir: Path, backend: Backend,
              attempt_info: dict[str, Any] | None = None, overview: list[tuple[str, str, str]] | None = None) -> int:
    """Launch one stage with `backend` and record it. Returns 0 done, 75 stopped after a checkpoint,
    2 bad input, else the failure's code. `attempt_info` adds to the ledger's attempt record (job ids);
    `overview`: the plan's stages as the live view lists them (`watch.Watch`)."""
    r, spec = step.stage, step.spec
    assert spec is not None, f"{r.name}: upstream outputs must exist by now"
    folder = stage_dir(run_dir, r.name)
    resumed_from = resumable(folder, spec.fingerprint, spec.any_world) if step.action == "resume" else None
    change = {"world_size_change": c} if resumed_from and (c := world_size_change(folder, r.world_size)) else {}
    spec_path = folder / "spec.json"
    try:
        with led.edit():
            entry = led.stage(r.name)
            if resumed_from is None:
                start_over(folder, entry)
            else:
                settle(folder, entry)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "error.json").unlink(missing_ok=True)
            write_atomic(spec_path, spec.model_dump_json(indent=2) + "\n")
            attempt_no = len(entry["attempts"]) + 1
            argv = backend.command(r.kind, spec_path, r.nproc_per_node, folder / "logs" / f"attempt-{attempt_no}",
                                   r.nnodes)
            entry.pop("damage", None)
            ledger.set_state(entry, "running", kind=r.kind, fingerprint=spec.fingerprint, settings=settings(spec),
                             inputs=inputs_of(spec), output=None, metrics=None)
            entry["attempts"].append({"attempt": attempt_no, "backend": backend.name, "started": ledger.now(),
                                      "resumed_from": resumed_from, "world_size": r.world_size, **change,
                                      "command": argv, **environment(),
                                      **(attempt_info or {})})
    except (OSError, LedgerError):  # a full disk before launch: put back what start_over set aside
        with contextlib.suppress(OSError):
            restore(folder, led.stage(r.name))
        raise
    print(f"== {r.name} ({r.kind}): {step.action} ({step.reason}), {r.world_size} process(es)", flush=True)

    t0 = time.monotonic()
    log_dir = folder / "logs" / f"attempt-{attempt_no}"
    with Watch(r.name, r.kind, folder, log_dir, entry["attempts"][-1]["started"], overview):
        code, interrupted = backend.launch(argv)
    rank0 = link_logs(log_dir)
    stage_env = stage_environment(folder)
    resumed = resumed_at(folder, resumed_from, entry["attempts"][-1]["started"])
    result = read_result(folder, spec.fingerprint)
    bad_input = read_bad_input(folder)
    checkpoint = resumable(folder, spec.fingerprint, spec.any_world)
    damaged: tuple[str, str] | None = None
    with led.edit():
        entry = led.stage(r.name)
        attempt = entry["attempts"][-1]
        attempt.update(ended=ledger.now(), exit_code=code, wall_s=round(time.monotonic() - t0, 1), **resumed)
        if stage_env is not None:
            attempt["stage_environment"] = stage_env
        if entry["state"] == "cancelled":  # `baton cancel` stopped it: that is the story, whatever the exit
            outcome, ret = "cancelled", code or EXIT_STOPPED
        elif code == 0 and result is not None:
            _record_result(entry, result, folder)
            outcome, ret = "done", 0
        elif interrupted or code == EXIT_STOPPED:
            # a stop asked for is a stop, wherever it found the stage: also in its start-up, before its ranks had
            # a handler for the signal (killed by it) or while it was failing for another reason
            ledger.set_state(entry, "preempted")
            outcome = f"stopped at {checkpoint}; running it again resumes" if checkpoint else \
                "stopped on the signal before it had anything to keep; running it again starts it over"
            ret = EXIT_STOPPED
            if code != EXIT_STOPPED:
                attempt.update(exit_code=EXIT_STOPPED, launcher_exit_code=code)
        elif bad_input is not None and bad_input.no_space:
            ledger.set_state(entry, "failed")
            attempt["error"] = bad_input.message
            outcome = (f"{bad_input.message}; free space and run again: it resumes from the newest intact "
                       f"checkpoint; logs in {log_dir}")
            ret = EXIT_BAD_INPUT
        elif bad_input is not None:
            ledger.set_state(entry, "failed")
            attempt["error"] = bad_input.message
            outcome, ret = f"bad input: {bad_input.message}; logs in {log_dir}", EXIT_BAD_INPUT
            if bad_input.changed_input is not None:
                damaged = _mark_upstream(led.data, bad_input.changed_input, r.name)
        else:
            ledger.set_state(entry, "failed")
            logs = f"rank 0's stderr: {rank0}" if rank0 else f"logs in {folder / 'logs'}"
            outcome, ret = f"failed with exit code {code}; {logs}", code or 1
            if code < 0:  # killed by a signal: the shell's 128 + its number, not the number modulo 256
                outcome, ret = f"killed by {_signal_name(-code)}; {logs}", 128 - code
            tail = error_tail(log_dir)
            if tail:
                whose = "torchrun's stderr" if tail[0].name == TORCHRUN_LOG else "rank 0's stderr"
                print(f"== {r.name}: the end of {whose} ({tail[0]}):\n{tail[1]}", flush=True)
        attempt["outcome"] = entry["state"]
        # a bad input, or a failure before the input checks passed: the output this attempt was to replace
        # comes back, and with it the stage's state (the failed attempt stays recorded)
        refused = bad_input is not None and not bad_input.no_space
        if entry["state"] == "failed" and (refused or not passed_checks(folder)) and restore(folder, entry):
            attempt["kept_previous"] = True
            outcome += f"; its previous output is kept (state {entry['state']})"
        else:
            settle(folder, entry)
    if ret == 0 and spec.checkpoint is not None:  # done and recorded: its checkpoints resume nothing now
        keep_when_done(folder, spec.checkpoint.keep_when_done)
    print(f"== {r.name}: {outcome} ({attempt['wall_s']} s)", flush=True)
    if damaged:
        print(f"== {damaged[0]}: recorded as damaged ({damaged[1]}); the next `baton run` reruns it and its "
              "descendants", flush=True)
    return ret


def _mark_upstream(data: dict[str, Any], changed: ChangedInput, reader: str) -> tuple[str, str] | None:
    """A stage refused an input because its digest differs: when that input is a done stage's final/, record the
    stage as damaged. (stage, why), or None for an input no stage made (a pretrained folder: its digest is taken
    again at the next plan)."""
    for name, entry in data["stages"].items():
        if (entry.get("output") or {}).get("path") == changed.path:
            why = f"{reader} found its final/ with digest {short(changed.digest)}, not the recorded " \
                  f"{short(changed.expected)}"
            if ledger.mark_damaged(entry, f"final/ holds {short(changed.digest)}, not the recorded "
                                          f"{short(changed.expected)} (found by {reader})"):
                return name, why
    return None


def resumed_at(folder: Path, planned: str | None, started: str) -> dict[str, Any]:
    """{"resumed_from", "passed_over"} when the stage resumed from another checkpoint than the newest complete one
    the plan named (it was damaged: the stage passed over it for an older intact one), read from the stage's start
    record of this attempt; {} when it resumed where planned (or did not start)."""
    if planned is None:
        return {}
    since = dt.datetime.fromisoformat(started).timestamp()
    starts = [r for r in read_metrics(folder) if r.get("event") == "start" and isinstance(r.get("step"), int)
              and isinstance(r.get("time"), (int, float)) and r["time"] >= since]
    if not starts or starts[0]["step"] == step_of(planned):
        return {}
    used = starts[0]["step"]
    return {"resumed_from": tag_of(used) if used else None,
            "passed_over": [t for t in complete_tags(folder) if used < step_of(t) <= step_of(planned)]}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def stage_environment(folder: Path) -> dict[str, Any] | None:
    """What the stage reported it ran on (torch build, CUDA, NCCL, GPU) in its newest start record."""
    starts = [r for r in read_metrics(folder) if r.get("event") == "start"]
    env = starts[-1].get("environment") if starts else None
    return env if isinstance(env, dict) else None


def error_tail(log_dir: Path, lines: int = 25) -> tuple[Path, str] | None:
    """(file, last lines) of the first rank's stderr log of an attempt, if it wrote anything; else of the
    launcher's own stderr (torchrun's: it failed before any rank did, e.g. a port in use)."""
    for path in [log_dir / "rank-0.stderr", *sorted(log_dir.glob("**/0/stderr.log")), log_dir / TORCHRUN_LOG]:
        try:
            text = path.read_text(errors="replace").rstrip()
        except OSError:
            continue
        if text:
            return path, "\n".join(text.splitlines()[-lines:])
    return None


# eval.best's record in result.json, kept in the ledger where given: the step final/ holds, the last step's
# metrics beside the best's, an early stop's reason
SELECTED = ("best_step", "last_metrics", "stopped_early")


def _record_result(entry: dict[str, Any], result: Result, folder: Path) -> None:
    """A done stage: its output digest (the stage's) and, beside it, its files' sizes and mtimes, which let a
    later plan trust the digest without hashing the folder again (`plan.output_damage`)."""
    final = final_dir(folder)
    output = result.output.model_dump() | ({"stat": folder_stat(final)} if final.is_dir() else {})
    for key in SELECTED:
        entry.pop(key, None)  # an earlier run's
    ledger.set_state(entry, "done", output=output, metrics=result.metrics, steps=result.steps,
                     **result.model_dump(include=set(SELECTED), exclude_none=True))


# ----------------------------------------------------------------- starting over without losing the old output
#
# A stage that starts over starts clean, but what it replaces is only moved aside (into previous/, with the
# ledger entry that describes it under "previous") until the new attempt gets past its input checks. An attempt
# that fails before that (exit 2: bad input) puts everything back.


def start_over(folder: Path, entry: dict[str, Any]) -> None:
    """Before a stage starts over (not a resume): move what its folder holds aside (Slurm's logs stay)."""
    if not folder.is_dir():
        return
    settle(folder, entry)
    aside = folder / PREVIOUS
    if aside.is_dir():
        # set aside before and not settled since (`baton submit`, or a driver that died before the stage passed
        # its checks): previous/ holds the output, what is beside it is the debris of that attempt
        _remove([c for c in folder.iterdir() if c.name not in KEPT])
        entry.setdefault("previous", _snapshot(entry))
        return
    contents = [c for c in folder.iterdir() if c.name not in KEPT]
    if not contents:
        return
    aside.mkdir()
    for child in contents:
        child.rename(aside / child.name)
    entry["previous"] = _snapshot(entry)


def passed_checks(folder: Path) -> bool:
    """Whether the attempt in `folder` got past its input checks: it wrote its metrics "start" record (after
    model and data set-up), a complete checkpoint or its result."""
    if (folder / "result.json").is_file() or complete_tags(folder):
        return True
    return any(r.get("event") == "start" for r in read_metrics(folder))


def settle(folder: Path, entry: dict[str, Any]) -> None:
    """Once an attempt got past its input checks, the output it replaces is gone for good."""
    aside = folder / PREVIOUS
    if aside.is_dir() and passed_checks(folder):
        shutil.rmtree(aside)
    if not aside.is_dir():
        entry.pop("previous", None)


def restore(folder: Path, entry: dict[str, Any]) -> bool:
    """Put back what `start_over` moved aside: files exactly as they were (the failed attempt's logs join the
    old ones) and the ledger entry's state, output and settings (its attempts stay). False: nothing was aside."""
    aside = folder / PREVIOUS
    if not aside.is_dir():
        return False
    _remove([c for c in folder.iterdir() if c.name not in (*KEPT, "logs")])
    for child in aside.iterdir():
        target = folder / child.name
        if child.name == "logs" and child.is_dir() and target.is_dir():
            for log in child.iterdir():
                _remove([target / log.name] if (target / log.name).exists() else [])
                log.rename(target / log.name)
            child.rmdir()
        else:
            child.rename(target)
    aside.rmdir()
    before = entry.pop("previous", None)
    if before is not None:
        for key in [k for k in entry if k not in _HELD]:
            del entry[key]
        ledger.set_state(entry, before.pop("state", "pending"), **before)
    return True


_HELD = ("attempts", "slurm", "previous")  # entry fields that a restore keeps as they are now


def _snapshot(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in entry.items() if k not in _HELD}


def _remove(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


# ----------------------------------------------------------------- what an attempt ran with


def environment() -> dict[str, Any]:
    """Host, platform and package versions for an attempt's record, read without torch; CUDA, NCCL and the GPUs
    come from the stage's own start record (`stage_environment`)."""
    return {"host": socket.gethostname(), "platform": platform.platform(), "versions": versions()}


@functools.cache
def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def version_drift(entry: dict[str, Any]) -> str | None:
    """`made with torch 2.12.0, deepspeed 0.18.0; now torch 2.13.0, deepspeed 0.19.8` when the attempt that made a
    stage's kept output (its newest attempt, passing over failed ones whose previous output was kept) ran under
    other package versions than now."""
    made = [a for a in entry.get("attempts") or [] if a.get("versions") and not a.get("kept_previous")]
    if not made:
        return None
    then, now = made[-1]["versions"], versions()
    changed = [k for k in now if k in then and then[k] != now[k]]
    if not changed:
        return None
    return (f"made with {', '.join(f'{k} {then[k]}' for k in changed)}; "
            f"now {', '.join(f'{k} {now[k]}' for k in changed)}")


def inputs_of(spec: Spec) -> dict[str, Any]:
    """Which checkpoints, folders and files fed a stage, with their digests: {input name: ref(s), "data": …}."""
    def entry(ref: Ref) -> dict[str, Any]:
        return ref.model_dump(exclude={"config"})

    refs = {name: [entry(r) for r in value] if isinstance(value, list) else entry(value)
            for name, value in spec.inputs.items()}
    return refs | {"data": dict(spec.data.digests)}


def adopt_finished(led: ledger.Ledger, stages: list[Resolved], run_dir: Path) -> None:
    """A stage that finished after its driver died has a result.json the ledger never saw: record it."""
    for r in stages:
        entry = led.data["stages"].get(r.name)
        if entry and entry.get("state") in ("running", "preempted", "failed") and entry.get("fingerprint"):
            folder = stage_dir(run_dir, r.name)
            result = read_result(folder, entry["fingerprint"])
            if result is not None:
                _record_result(entry, result, folder)
                settle(folder, entry)
                led.save()

