"""One attempt at one stage: write its spec, launch it with a back-end, record what happened in the ledger.

Used by the driver (`baton run`) and by a Slurm job (`baton job`) alike.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from contract.files import write_atomic
from contract.layout import (
    EXIT_BAD_INPUT,
    EXIT_STOPPED,
    Result,
    read_bad_input,
    read_result,
    resumable,
    stage_dir,
)
from contract.spec import Ref, Spec
from launcher import ledger
from launcher.backends import Backend
from launcher.plan import Step, outputs_of
from launcher.resolve import Resolved, build_spec, settings


def run_stage(step: Step, led: ledger.Ledger, run_dir: Path, backend: Backend,
              attempt_info: dict[str, Any] | None = None) -> int:
    """Launch one stage with `backend` and record it. Returns 0 done, 75 stopped after a checkpoint,
    2 bad input, else the failure's code. `attempt_info` adds to the ledger's attempt record (job ids)."""
    r = step.stage
    spec = step.spec or build_spec(r, run_dir, outputs_of(led.data))
    assert spec is not None, f"{r.name}: upstream outputs must exist by now"
    folder = stage_dir(run_dir, r.name)
    resumed_from = resumable(folder, spec.fingerprint) if step.action == "resume" else None
    if resumed_from is None:
        clear_stage(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.json").unlink(missing_ok=True)
    spec_path = folder / "spec.json"
    write_atomic(spec_path, spec.model_dump_json(indent=2) + "\n")

    with led.edit():
        entry = led.stage(r.name)
        attempt_no = len(entry["attempts"]) + 1
        argv = backend.command(r.kind, spec_path, r.nproc_per_node, folder / "logs" / f"attempt-{attempt_no}", r.nnodes)
        ledger.set_state(entry, "running", kind=r.kind, fingerprint=spec.fingerprint, settings=settings(spec),
                         inputs=inputs_of(spec), output=None, metrics=None)
        entry["attempts"].append({"attempt": attempt_no, "backend": backend.name, "started": ledger.now(),
                                  "resumed_from": resumed_from, "command": argv, **(attempt_info or {})})
    print(f"== {r.name} ({r.kind}): {step.action} ({step.reason}), {r.world_size} process(es)", flush=True)

    t0 = time.monotonic()
    code, interrupted = backend.launch(argv)
    result = read_result(folder, spec.fingerprint)
    bad_input = read_bad_input(folder)
    checkpoint = resumable(folder, spec.fingerprint)
    with led.edit():
        entry = led.stage(r.name)
        attempt = entry["attempts"][-1]
        attempt.update(ended=ledger.now(), exit_code=code, wall_s=round(time.monotonic() - t0, 1))
        if entry["state"] == "cancelled":  # `baton cancel` stopped it: that is the story, whatever the exit
            outcome, ret = "cancelled", code or EXIT_STOPPED
        elif code == 0 and result is not None:
            _record_result(entry, result)
            outcome, ret = "done", 0
        elif (interrupted or code == EXIT_STOPPED) and checkpoint:
            ledger.set_state(entry, "preempted")
            outcome, ret = f"stopped at {checkpoint}; running it again resumes", EXIT_STOPPED
        elif bad_input is not None:
            ledger.set_state(entry, "failed")
            attempt["error"] = bad_input.message
            outcome, ret = f"bad input: {bad_input.message}", EXIT_BAD_INPUT
        else:
            ledger.set_state(entry, "failed")
            outcome, ret = f"failed with exit code {code}; logs in {folder / 'logs'}", code or 1
            tail = error_tail(folder / "logs" / f"attempt-{attempt_no}")
            if tail:
                print(f"== {r.name}: the end of rank 0's stderr ({tail[0]}):\n{tail[1]}", flush=True)
        attempt["outcome"] = entry["state"]
    print(f"== {r.name}: {outcome} ({attempt['wall_s']} s)", flush=True)
    return ret


def error_tail(log_dir: Path, lines: int = 25) -> tuple[Path, str] | None:
    """(file, last lines) of the first rank's stderr log of an attempt, if it wrote anything."""
    for path in sorted(log_dir.glob("**/0/stderr.log")):
        text = path.read_text(errors="replace").rstrip()
        if text:
            return path, "\n".join(text.splitlines()[-lines:])
    return None


def _record_result(entry: dict[str, Any], result: Result) -> None:
    ledger.set_state(entry, "done", output=result.output.model_dump(), metrics=result.metrics, steps=result.steps)


def clear_stage(folder: Path) -> None:
    """A stage that starts over starts clean: no stale checkpoints, results or errors (its Slurm logs stay)."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name != "slurm":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


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
            result = read_result(stage_dir(run_dir, r.name), entry["fingerprint"])
            if result is not None:
                _record_result(entry, result)
                led.save()

