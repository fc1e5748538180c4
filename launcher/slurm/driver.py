"""Slurm: one sbatch job per stage, chained with afterok; inside a job, srun starts one torchrun per node.

`baton submit` queues every stage the plan says must run and returns. Each job runs
`baton job RUN STAGE`, which builds the stage's spec from the ledger (its inputs are
done by then), launches it with srun, and records the attempt and its job id. On the
time-limit warning (USR1) or preemption (TERM) the stage checkpoints and exits 75,
and the job requeues itself with `scontrol requeue` until `max_requeues` is spent;
the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from contract.files import file_digest, write_atomic
from contract.layout import EXIT_STOPPED, resumable, stage_dir
from launcher import decisions, ledger
from launcher.attempts import run_stage, start_over
from launcher.errors import BatonError, ConfigError, GateStopped
from launcher.manifest import load
from launcher.pipeline import plan_run, record_manifest
from launcher.plan import Step
from launcher.resolve import Resolved, build_spec, resolve
from launcher.slurm import calls, jobs, sbatch
from launcher.slurm.srun import SrunBackend

LEDGER_WAIT_S = 300  # jobs take turns on the ledger lock, briefly


# ----------------------------------------------------------------- submit


def submit(manifest: Path, run_dir: Path | None = None, only: str | None = None, start: str | None = None) -> int:
    stages, run_dir, manifest, steps = plan_run(manifest, run_dir, only, start, nodes_available=None)
    todo = [s for s in steps if s.action != "skip"]
    if not todo:
        records = decisions.decide_all(ledger.read(run_dir), stages)
        stopped = decisions.stopped_at(records, [s.stage.group for s in steps if s.selected])
        if stopped:
            raise GateStopped(decisions.stopped_text(records[stopped], replayed=True))
        print(f"{run_dir}: nothing to submit; every selected stage is done and unchanged")
        return 0
    jobs.require("sbatch")
    with ledger.Ledger(run_dir) as led:
        live = {name: e["slurm"]["job_id"] for name, e in led.data["stages"].items()
                if e.get("state") in ledger.ACTIVE and e.get("slurm") and jobs.job_states([e["slurm"]["job_id"]])}
        if live:
            raise BatonError(f"{run_dir}: jobs of this run are still queued or running "
                             f"({', '.join(f'{n}: {j}' for n, j in live.items())}); `baton cancel {run_dir}` first")
        record_manifest(led, stages, manifest, run_dir)
        token = secrets.token_hex(3)  # in every job name of this submission, so that squeue can tell its jobs apart
        submitted: dict[str, str] = {}  # instance -> job
        jobs_of: dict[str, list[str]] = {}  # manifest stage -> the jobs of its instances
        for step in todo:
            r = step.stage
            folder = stage_dir(run_dir, r.name)
            if step.action not in ("resume", "wait"):  # aside until the job's attempt passes its input checks
                start_over(folder, led.stage(r.name))
                led.save()
            name = job_name(r, token)
            script = write_script(r, run_dir, name)
            # after every instance of each stage it reads (a job decided away exits 0), a retry after the attempt
            # before it; variants side by side
            deps = [j for u in r.upstream for j in jobs_of.get(u, [])]
            if r.role == "retry" and jobs_of.get(r.group):
                deps.append(jobs_of[r.group][-1])
            argv = ["sbatch", "--parsable", *([f"--dependency=afterok:{':'.join(deps)}"] if deps else []), str(script)]
            try:
                job_id = calls.sbatch_once(argv, name)
            except BatonError as e:
                done = ", ".join(f"{n}: job {j}" for n, j in submitted.items()) or "none"
                raise BatonError(f"stage {r.name} not submitted: {e} (already submitted: {done})") from None
            entry = led.stage(r.name)
            ids = (entry.get("slurm") or {}).get("job_ids", [])
            ledger.set_state(entry, "queued", kind=r.kind)
            entry["slurm"] = {"job_id": job_id, "job_ids": [*ids, job_id], "script": str(script),
                              "submitted": ledger.now(), "depends_on": deps}
            led.save()
            submitted[r.name] = job_id
            jobs_of.setdefault(r.group, []).append(job_id)
            print(f"submitted {r.name}: job {job_id}", flush=True)
    return 0


def job_name(r: Resolved, token: str) -> str:
    """baton.<run>.<stage>.<token>: `token` is one `baton submit`'s, so that the name finds the one job an sbatch
    call queued (`calls.sbatch_once`); a comma becomes _ (squeue reads a comma in --name as a list)."""
    return f"baton.{r.base['run_name']}.{r.name}.{token}".replace(",", "_")


def write_script(r: Resolved, run_dir: Path, name: str) -> Path:
    """The stage's job script, kept in its slurm/ folder; `name`: the job's name."""
    folder = stage_dir(run_dir, r.name) / "slurm"
    if "%" in str(folder):
        raise ConfigError(f"{folder}: Slurm reads % in a log path as a pattern (%j, %N …); "
                          "use a run folder and stage name without %")
    folder.mkdir(parents=True, exist_ok=True)
    preamble = Path(r.slurm["preamble"]).read_text() if r.slurm.get("preamble") else ""
    try:
        text = sbatch.render(
            job_name=name,
            nodes=r.nnodes,
            output=f"{folder}/job-%j.out",
            settings=r.slurm,
            command=[sys.executable, "-m", "launcher.cli", "job", str(run_dir), r.name],
            preamble=preamble,
        )
    except ValueError as e:
        raise ConfigError(f"stage {r.name}: slurm.extra: {e}") from None
    path = folder / "job.sbatch"
    write_atomic(path, text)
    return path


# ----------------------------------------------------------------- inside the job


def run_job(run_dir: Path, name: str) -> int:
    """The body of a stage's job: run the stage (fresh or resumed) and requeue on preemption."""
    run_dir = run_dir.resolve()
    data = ledger.read(run_dir)
    manifest = Path(data.get("manifest", ""))
    if not manifest.is_file() or file_digest(manifest) != data.get("manifest_digest"):
        raise ConfigError(f"{manifest}: changed or gone since `baton submit`; cancel and submit again")
    stages = resolve(load(manifest), under_slurm=True)
    r = next((s for s in stages if s.name == name), None)
    if r is None:
        raise ConfigError(f"{manifest}: no stage {name!r}")
    led = ledger.Ledger(run_dir, wait_s=LEDGER_WAIT_S)
    with led:  # the decisions taken so far, replayed: is this instance still to run, on which inputs?
        records, said = decisions.settle(led, stages)
        for line in said:
            print(line, flush=True)
        wanted = decisions.wanted(r, records, list(decisions.groups(stages)))
        if wanted in ("away", "stopped"):
            stop = decisions.stopped_at(records, records)
            why = records[stop]["reason"] if wanted == "stopped" and stop else decisions.not_needed(records[r.group])
            ledger.set_state(led.stage(name), "skipped", skipped=why)
            led.save()
            print(f"== {name}: not run: {why}", flush=True)
            return 0  # so that the afterok chain goes on: the jobs after it decide for themselves
        spec = build_spec(r, run_dir, decisions.outputs_of(led.data, stages))
    if wanted == "undecided" or spec is None:
        raise BatonError(f"stage {name}: its inputs ({', '.join(r.upstream)}) are not done or not decided")
    tag = resumable(stage_dir(run_dir, name), spec.fingerprint, spec.any_world)
    step = Step(r, "resume" if tag else "run", f"job {os.environ.get('SLURM_JOB_ID')}", resume_tag=tag, spec=spec)
    job_id = os.environ["SLURM_JOB_ID"]
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    info = {"job_id": job_id, "restart": restart, "nodes": os.environ.get("SLURM_JOB_NODELIST")}
    code = run_stage(step, led, run_dir, SrunBackend(), attempt_info=info)
    if code == 0:
        with led:  # the decisions this stage's end allows (a stop ends the run: the jobs after it skip themselves)
            records, said = decisions.settle(led, stages)
        for line in said:
            print(line, flush=True)
        return 0
    if code != EXIT_STOPPED:
        return code
    try:
        state, _ = jobs.job_states([job_id]).get(job_id, ("", ""))
    except calls.NoAnswer as e:  # nor would it take a requeue: the stage stays preempted, for the next submit or run
        print(f"== {name}: not requeueing job {job_id}: {e}", flush=True)
        return code
    with led.edit():
        entry = led.stage(name)
        if entry["state"] == "cancelled":
            return code
        if state != "RUNNING":  # Slurm is ending the job (scancel, a requeue by hand): leave it to Slurm
            print(f"== {name}: job {job_id} is {state or 'gone'}; not requeueing it", flush=True)
            return code
        if restart >= r.slurm["max_requeues"]:
            print(f"== {name}: stopped {restart + 1} times; max_requeues {r.slurm['max_requeues']} spent", flush=True)
            return code
        ledger.set_state(entry, "requeued")
        entry["attempts"][-1]["outcome"] = "requeued"
    print(f"== {name}: requeueing job {job_id} (restart {restart + 1} of at most {r.slurm['max_requeues']})",
          flush=True)
    refused = jobs.requeue(job_id)  # Slurm ends this job now; the requeued one resumes from the checkpoint
    if refused is None:
        return 0
    with led.edit():
        entry = led.stage(name)
        ledger.set_state(entry, "preempted")
        entry["attempts"][-1]["outcome"] = "preempted"
    # not 0: a job that ends COMPLETED would start its afterok dependants on inputs that do not exist
    print(f"== {name}: Slurm refused the requeue ({refused}); the stage stays preempted and "
          "`baton submit` or `baton run` resumes it", flush=True)
    return code


# ----------------------------------------------------------------- status and cancel


def cancel(run_dir: Path) -> int:
    jobs.require("scancel")
    run_dir = run_dir.resolve()
    with ledger.Ledger(run_dir, wait_s=LEDGER_WAIT_S) as led:
        live = {name: e["slurm"]["job_id"] for name, e in led.data["stages"].items()
                if e.get("state") in ledger.ACTIVE and e.get("slurm")}
        if not live:
            print(f"{run_dir}: no queued or running jobs")
            return 0
        refused = jobs.cancel(list(live.values()))
        for name, job in live.items():
            if job in refused:
                print(f"not cancelled {name}: job {job} is {refused[job]}", file=sys.stderr)
                continue
            ledger.set_state(led.stage(name), "cancelled")
            print(f"cancelled {name}: job {job}")
        led.save()
    if refused:
        raise BatonError(f"{len(refused)} job(s) of {run_dir} are still live; run `baton cancel` again or scancel them")
    return 0
