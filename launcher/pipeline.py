"""The driver: manifest -> plan -> back-end -> ledger, one stage at a time."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from launcher import dsconfig, ledger
from launcher.backends.local import LocalBackend
from launcher.errors import ConfigError
from launcher.files import file_digest, write_atomic
from launcher.manifest import Loaded, load
from launcher.plan import Step, complete_checkpoint, make_plan, outputs_of
from launcher.resolve import Resolved, build_spec, default_run_dir, resolve, settings, stage_dir

EX_TEMPFAIL = 75


def validate(manifest: Path) -> list[Resolved]:
    """Schema, references, files and DeepSpeed's own verdict on every stage's config."""
    stages = resolve(load(manifest))
    check_deepspeed(stages)
    return stages


def check_nodes(loaded: Loaded, stages: list[Resolved], available: int | None) -> None:
    """A stage may not ask for more nodes than the back-end has (torchrun alone: one)."""
    for r in stages:
        if available is not None and r.nnodes > available:
            own = loaded.manifest.stages[r.index].launcher.nnodes is not None
            path = ("stages", r.index, "launcher", "nnodes") if own else ("defaults", "launcher", "nnodes")
            where = "this allocation has" if available > 1 else "the local back-end runs torchrun on"
            raise ConfigError(f"{loaded.where(path)}: {r.nnodes} nodes, but {where} {available}; "
                              "multi-node stages run with `baton submit` (Slurm) or inside an allocation")


def check_deepspeed(stages: list[Resolved]) -> None:
    problems = []
    for r in stages:
        if r.base["deepspeed"] is not None:
            try:
                dsconfig.check_with_deepspeed(r.base["deepspeed"], r.ds_source)
            except ConfigError as e:
                problems += e.problems
    if problems:
        raise ConfigError(problems)


def plan_run(manifest: Path, run_dir: Path | None, only: str | None, start: str | None,
             nodes_available: int | None = 1) -> tuple[list[Resolved], Path, Path, list[Step]]:
    """Load, resolve and plan, and check everything that can refuse the manifest, before the run folder
    is touched. `nodes_available`: how many nodes the back-end can use (None: any, as Slurm jobs)."""
    loaded = load(manifest)
    stages = resolve(loaded)
    check_nodes(loaded, stages, nodes_available)
    run_dir, manifest = (run_dir or default_run_dir(loaded)).resolve(), manifest.resolve()
    steps = make_plan(stages, ledger.read(run_dir), run_dir, only, start)
    check_deepspeed([s.stage for s in steps if s.action != "skip"])
    return stages, run_dir, manifest, steps


def record_manifest(led: ledger.Ledger, stages: list[Resolved], manifest: Path, run_dir: Path) -> None:
    led.data.setdefault("created", ledger.now())
    led.data.update(run=stages[0].base["run_name"], manifest=str(manifest), manifest_digest=file_digest(manifest))
    write_atomic(run_dir / "manifest.yaml", manifest.read_text(encoding="utf-8"))
    led.save()


def run(manifest: Path, run_dir: Path | None = None, dry_run: bool = False,
        only: str | None = None, start: str | None = None) -> int:
    from launcher.backends.slurm import SrunBackend, allocation_nodes

    # inside a Slurm allocation (an sbatch of the whole manifest), stages start with srun on its nodes
    nodes = allocation_nodes()
    backend = SrunBackend() if nodes else LocalBackend()
    stages, run_dir, manifest, steps = plan_run(manifest, run_dir, only, start, nodes or 1)
    if dry_run:
        print_plan(steps, run_dir, backend)
        return 0
    with ledger.Ledger(run_dir) as led:
        adopt_finished(led, stages, run_dir)
        steps = make_plan(stages, led.data, run_dir, only, start)  # again, under the lock
        if all(s.action == "skip" for s in steps):
            print(f"{run_dir}: nothing to do; every selected stage is done and unchanged")
            return 0
        record_manifest(led, stages, manifest, run_dir)
        for step in steps:
            if step.action == "skip":
                print(f"== {step.stage.name}: skip ({step.reason})")
                continue
            code = run_stage(step, led, run_dir, backend, {"job_id": os.environ["SLURM_JOB_ID"]} if nodes else None)
            if code != 0:
                return code
    return 0


def resume(run_dir: Path) -> int:
    """`baton run` with the manifest recorded in the run's ledger."""
    recorded = ledger.read(run_dir).get("manifest")
    if not recorded:
        raise ConfigError(f"{run_dir}: no run recorded here (no {ledger.LEDGER} with a manifest)")
    manifest = Path(recorded)
    if not manifest.is_file():
        raise ConfigError(f"{run_dir}: the run's manifest {manifest} is gone; a copy is in {run_dir / 'manifest.yaml'}")
    return run(manifest, run_dir)


def run_stage(step: Step, led: ledger.Ledger, run_dir: Path, backend: LocalBackend,
              attempt_info: dict[str, Any] | None = None) -> int:
    """Launch one stage with `backend` and record it. Returns 0 done, 75 stopped after a checkpoint,
    2 bad input, else the failure's code. `attempt_info` adds to the ledger's attempt record (job ids)."""
    r = step.stage
    spec = step.spec or build_spec(r, run_dir, outputs_of(led.data))
    assert spec is not None, f"{r.name}: upstream outputs must exist by now"
    folder = stage_dir(run_dir, r.name)
    resumed_from = complete_checkpoint(folder, spec["fingerprint"]) if step.action == "resume" else None
    if resumed_from is None:
        clear_stage(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.json").unlink(missing_ok=True)
    spec_path = folder / "spec.json"
    write_atomic(spec_path, json.dumps(spec, indent=2) + "\n")

    with led.edit():
        entry = led.stage(r.name)
        attempt_no = len(entry["attempts"]) + 1
        argv = backend.command(r.kind, spec_path, r.nproc_per_node, folder / "logs" / f"attempt-{attempt_no}", r.nnodes)
        entry.update(state="running", kind=r.kind, fingerprint=spec["fingerprint"], settings=settings(spec),
                     inputs=inputs_of(spec), output=None, metrics=None)
        entry["attempts"].append({"attempt": attempt_no, "backend": backend.name, "started": ledger.now(),
                                  "resumed_from": resumed_from, "command": argv, **(attempt_info or {})})
    print(f"== {r.name} ({r.kind}): {step.action} ({step.reason}), {r.world_size} process(es)", flush=True)

    t0 = time.monotonic()
    code, interrupted = backend.launch(argv)
    result = read_result(folder, spec["fingerprint"])
    bad_input = read_json(folder / "error.json")
    checkpoint = complete_checkpoint(folder, spec["fingerprint"])
    with led.edit():
        entry = led.stage(r.name)
        attempt = entry["attempts"][-1]
        attempt.update(ended=ledger.now(), exit_code=code, wall_s=round(time.monotonic() - t0, 1))
        if entry["state"] == "cancelled":  # `baton cancel` stopped it: that is the story, whatever the exit
            outcome, ret = "cancelled", code or EX_TEMPFAIL
        elif code == 0 and result is not None:
            entry.update(state="done", output=result["output"], metrics=result.get("metrics"), steps=result.get("steps"))
            outcome, ret = "done", 0
        elif (interrupted or code == EX_TEMPFAIL) and checkpoint:
            entry["state"] = "preempted"
            outcome, ret = f"stopped at {checkpoint}; running it again resumes", EX_TEMPFAIL
        elif bad_input is not None:
            entry["state"] = "failed"
            attempt["error"] = bad_input.get("message")
            outcome, ret = f"bad input: {bad_input.get('message')}", 2
        else:
            entry["state"] = "failed"
            outcome, ret = f"failed with exit code {code}; logs in {folder / 'logs'}", code or 1
        attempt["outcome"] = entry["state"]
    print(f"== {r.name}: {outcome} ({attempt['wall_s']} s)", flush=True)
    return ret


def clear_stage(folder: Path) -> None:
    """A stage that starts over starts clean: no stale checkpoints, results or errors (its Slurm logs stay)."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name != "slurm":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def inputs_of(spec: dict[str, Any]) -> dict[str, Any]:
    """Which checkpoint and which files fed a stage, with their digests."""
    refs = {k: {f: spec[k][f] for f in ("source", "stage", "path", "digest")} for k in ("init", "tokenizer") if spec[k]}
    return refs | {"data": spec["data"]["digests"]}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_result(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    result = read_json(folder / "result.json")
    if result is None:
        return None
    ok = result.get("status") == "done" and result.get("fingerprint") == fingerprint
    return result if ok else None


def adopt_finished(led: ledger.Ledger, stages: list[Resolved], run_dir: Path) -> None:
    """A stage that finished after its driver died has a result.json the ledger never saw: record it."""
    for r in stages:
        entry = led.data["stages"].get(r.name)
        if entry and entry.get("state") in ("running", "preempted", "failed") and entry.get("fingerprint"):
            result = read_result(stage_dir(run_dir, r.name), entry["fingerprint"])
            if result is not None:
                entry.update(state="done", output=result["output"], metrics=result.get("metrics"),
                             steps=result.get("steps"))
                led.save()


def print_plan(steps: list[Step], run_dir: Path, backend: LocalBackend) -> None:
    print(f"run folder {run_dir}  (back-end: {backend.name})")
    for n, step in enumerate(steps, 1):
        r = step.stage
        print(f"{n}. {r.name} [{r.kind}] {step.action.upper()}: {step.reason}")
        if step.action == "skip":
            continue
        base = step.spec or r.base
        for key in ("init", "tokenizer"):
            ref = base.get(key)
            if ref:
                what = ref["path"] or f"stages/{ref['stage']}/final (digest known after {ref['stage']} runs)"
                if ref["source"] == "config":
                    what = f"new {ref['config']['model_type']} model from config"
                print(f"   {key}: {what}" + (f"  {ref['digest']}" if ref.get("digest") else ""))
        for f, digest in base["data"]["digests"].items():
            print(f"   data: {f}  {digest}")
        if step.resume_tag:
            print(f"   resume: {stage_dir(run_dir, r.name) / 'ckpt' / step.resume_tag}")
        folder = stage_dir(run_dir, r.name)
        argv = backend.command(r.kind, folder / "spec.json", r.nproc_per_node, folder / "logs" / "attempt-N", r.nnodes)
        print(f"   output: {folder / 'final'}")
        print(f"   command: {shlex.join(argv)}")
    sys.stdout.flush()
