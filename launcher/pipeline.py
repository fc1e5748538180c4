"""The driver: manifest -> plan -> back-end -> ledger, one stage at a time."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from contract.files import file_digest, write_atomic
from contract.layout import final_dir, stage_dir
from launcher import decisions, dsconfig, hubcache, ledger, summary
from launcher.attempts import adopt_finished, run_stage, version_drift
from launcher.backends import Backend
from launcher.backends.local import LocalBackend
from launcher.digests import known_intact
from launcher.errors import BatonError, ConfigError, GateStopped
from launcher.manifest import Loaded, flat_references, load
from launcher.plan import Step, make_plan
from launcher.resolve import Resolved, default_run_dir, resolve
from launcher.slurm.srun import SrunBackend, allocation_nodes


def validate(manifest: Path) -> list[Resolved]:
    """Schema, references, files, the run folder's place and DeepSpeed's own verdict on every stage's config."""
    loaded = load(manifest)
    default_run_dir(loaded)  # refused where it (or a folder above it) is a file, as `run` would refuse it
    stages = resolve(loaded)
    check_offline(loaded)
    check_deepspeed(stages)
    return stages


def check_offline(loaded: Loaded, run_dir: Path | None = None) -> None:
    """With HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE), a hub model or dataset that is not in
    the local cache is a certain failure once the stage loads it: refused before launch, each name once, where the
    manifest writes it. `run_dir`: its datasets cache counts too (a dataset an earlier run of it loaded)."""
    problems, seen = [], set()
    base = loaded.file.parent
    for i, stage in enumerate(loaded.manifest.stages):
        for name, j, ref in flat_references(stage.references()):
            at = ("stages", i, name, *(() if j is None else (j,)), "pretrained")
            hub = ref.pretrained
            if hub is None or hub in seen or at not in loaded.lines or hub.startswith((".", "/")) or \
                    (base / hub).is_dir():
                continue
            seen.add(hub)
            if why := hubcache.offline_miss(hub, "model"):
                problems.append(f"{loaded.where(at)}: {why}, or give a local folder")
        for section in stage.data_sections():
            hub = section.data.hub
            if hub is None or hub in seen:
                continue
            seen.add(hub)
            extra = [run_dir / "cache" / "datasets"] if run_dir else []
            if why := hubcache.offline_miss(hub, "dataset", extra):
                problems.append(f"{loaded.where(('stages', i, *section.path, 'hub'))}: {why}, or give local files")
    if problems:
        raise ConfigError(problems)


def check_nodes(loaded: Loaded, stages: list[Resolved], available: int | None) -> None:
    """A stage may not ask for more nodes than the back-end has (torchrun alone: one)."""
    for r in stages:
        if available is not None and r.nnodes > available:
            own = "nnodes" in loaded.manifest.stages[r.index].launcher.model_fields_set
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
    stages = resolve(loaded, under_slurm=nodes_available is None)
    check_nodes(loaded, stages, nodes_available)
    run_dir, manifest = (run_dir or default_run_dir(loaded)).resolve(), manifest.resolve()
    check_offline(loaded, run_dir)
    steps = make_plan(stages, ledger.read(run_dir), run_dir, only, start)
    check_deepspeed([s.stage for s in steps if s.action != "skip"])
    return stages, run_dir, manifest, steps


def record_manifest(led: ledger.Ledger, stages: list[Resolved], manifest: Path, run_dir: Path) -> None:
    led.data.setdefault("created", ledger.now())
    led.data.update(run=stages[0].base["run_name"], manifest=str(manifest), manifest_digest=file_digest(manifest),
                    evals=list(dict.fromkeys(n for r in stages for n in r.base["shared_evals"])))
    write_atomic(run_dir / "manifest.yaml", manifest.read_text(encoding="utf-8"))
    led.save()


def run(manifest: Path, run_dir: Path | None = None, dry_run: bool = False,
        only: str | None = None, start: str | None = None) -> int:
    # inside a Slurm allocation (an sbatch of the whole manifest), stages start with srun on its nodes
    nodes = allocation_nodes()
    backend: Backend = SrunBackend() if nodes else LocalBackend()
    stages, run_dir, manifest, steps = plan_run(manifest, run_dir, only, start, nodes or 1)
    if dry_run:
        print_plan(steps, run_dir, backend)
        return 0
    with ledger.Ledger(run_dir) as led:
        adopt_finished(led, stages, run_dir)
        if keep_stats(led.data, run_dir):
            led.save()
        shown: set[str] = set()  # instances this run has printed or run
        ran: set[str] = set()  # … and of them, those it launched
        while True:  # run the first stage that can run, take the decisions its end allows, plan again
            records, said = decisions.settle(led, stages)
            for line in said:
                print(line, flush=True)
            steps = make_plan(stages, led.data, run_dir, only, start)  # under the lock, with the decisions so far
            step = next((s for s in steps if s.action in ("run", "resume", "rerun") and s.spec is not None), None)
            if not shown:
                if step is None and not decisions.stopped_at(records, records):
                    warn_versions(steps, led.data)
                    print(f"{run_dir}: nothing to do; every selected stage is done and unchanged")
                    print_summary(led.data, set())
                    return 0
                record_manifest(led, stages, manifest, run_dir)
            for s in steps:  # the skipped ones up to the one that runs
                if s.action == "skip" and s.stage.name not in shown and \
                        (step is None or s.stage.index <= step.stage.index):
                    print(f"== {s.stage.name}: skip ({s.reason})")
                    warn_versions([s], led.data)
                    shown.add(s.stage.name)
            if step is None:
                break
            warn_versions([step], led.data)
            shown.add(step.stage.name)
            ran.add(step.stage.name)
            code = run_stage(step, led, run_dir, backend, {"job_id": os.environ["SLURM_JOB_ID"]} if nodes else None,
                             overview=overview(steps, step, led.data))
            if code != 0:
                print_summary(led.data, ran)
                return code
        print_summary(led.data, ran)
    stopped = decisions.stopped_at(records, [s.stage.group for s in steps if s.selected])
    if stopped:
        raise GateStopped(decisions.stopped_text(records[stopped]))
    waiting = [s.stage.name for s in steps if s.action in ("run", "resume", "rerun")]
    if waiting:
        raise BatonError(f"not run: {', '.join(waiting)}: their inputs were not decided (see `baton status`)")
    return 0


def print_summary(data: dict[str, Any], ran: set[str]) -> None:
    """The run's outcome and each stage's key metric, last on the terminal: the live view has scrolled them away."""
    print("\n" + summary.table(data, ran), flush=True)


def overview(steps: list[Step], running: Step, data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(stage, kind, state) of the selected stages for the live view: kept ones as the ledger has them, the
    running one, the ones still to run."""
    rows = []
    for s in steps:
        if s.action == "skip":
            state = (data["stages"].get(s.stage.name) or {}).get("state", "skipped")
        else:
            state = "running" if s is running else "to run"
        rows.append((s.stage.name, s.stage.kind, state))
    return rows


def warn_versions(steps: list[Step], data: dict[str, Any]) -> None:
    """A warning, not an error: a stage kept (skipped when done, or resumed) was made under other package
    versions than this run's."""
    for step in steps:
        entry = data["stages"].get(step.stage.name) or {}
        if step.action == "resume" or (step.action == "skip" and entry.get("state") == "done"):
            drift = version_drift(entry)
            if drift:
                print(f"== {step.stage.name}: {drift}", flush=True)


def keep_stats(data: dict[str, Any], run_dir: Path) -> bool:
    """Record the stat of each done output this process has just hashed and found intact (a ledger from before
    stat records, or files touched), so the next plan trusts it without hashing. True if anything changed."""
    changed = False
    for name, entry in data["stages"].items():
        out = entry.get("output") or {}
        if entry.get("state") != "done" or not out.get("digest"):
            continue
        stat = known_intact(final_dir(stage_dir(run_dir, name)), out["digest"])
        if stat is not None and stat != out.get("stat"):
            out["stat"] = stat
            changed = True
    return changed


def resume(run_dir: Path) -> int:
    """`baton run` with the manifest recorded in the run's ledger."""
    recorded = ledger.read(run_dir).get("manifest")
    if not recorded:
        raise ConfigError(f"{run_dir}: no run recorded here (no {ledger.LEDGER} with a manifest)")
    manifest = Path(recorded)
    if not manifest.is_file():
        raise ConfigError(f"{run_dir}: the run's manifest {manifest} is gone; a copy is in {run_dir / 'manifest.yaml'}")
    return run(manifest, run_dir)


def print_plan(steps: list[Step], run_dir: Path, backend: Backend) -> None:
    print(f"run folder {run_dir}  (back-end: {backend.name})")
    for n, step in enumerate(steps, 1):
        r = step.stage
        print(f"{n}. {r.name} [{r.kind}] {step.action.upper()}: {step.reason}")
        if step.action == "skip":
            continue
        inputs = step.spec.model_dump()["inputs"] if step.spec else r.base["inputs"]
        for name, value in inputs.items():
            for ref in value if isinstance(value, list) else [value]:
                if ref["source"] == "config":
                    what = f"new {ref['config']['model_type']} model from config"
                else:
                    what = ref["path"] or f"stages/{ref['stage']}/final (digest known after {ref['stage']} runs)"
                print(f"   {name}: {what}" + (f"  {ref['digest']}" if ref.get("digest") else ""))
        for f, digest in r.base["data"]["digests"].items():
            print(f"   data: {f}  {digest}")
        folder = stage_dir(run_dir, r.name)
        if step.resume_tag:
            print(f"   resume: {folder / 'ckpt' / step.resume_tag}")
        argv = backend.command(r.kind, folder / "spec.json", r.nproc_per_node, folder / "logs" / "attempt-N", r.nnodes)
        print(f"   output: {final_dir(folder)}")
        print(f"   command: {shlex.join(argv)}")
    sys.stdout.flush()
