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
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from launcher import ledger
from launcher.backends import sbatch
from launcher.backends.local import LocalBackend, torchrun
from launcher.errors import BatonError, ConfigError
from launcher.files import file_digest, write_atomic
from launcher.manifest import load
from launcher.plan import Step, complete_checkpoint, outputs_of
from launcher.resolve import Resolved, build_spec, resolve, stage_dir

ACTIVE = ("queued", "running", "requeued")  # ledger states with a live job
LEDGER_WAIT_S = 300  # jobs take turns on the ledger lock, briefly


def allocation_nodes() -> int | None:
    """Nodes of the Slurm allocation this process runs in, or None outside one."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)


def head_node() -> str:
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


class SrunBackend(LocalBackend):
    """Inside a job or allocation: `srun` one torchrun per node, meeting at a c10d store on the first node."""

    name = "slurm"
    # srun ends the whole step on TERM (SIGKILL after KillWait, maybe mid-checkpoint) but only forwards USR1,
    # which torchrun passes on to the ranks: they checkpoint and exit 75 in their own time
    stop_signal = signal.SIGUSR1

    def command(self, kind: str, spec_path: Path, nproc_per_node: int, log_dir: Path, nnodes: int = 1) -> list[str]:
        job = int(os.environ["SLURM_JOB_ID"])
        port = 29500 + job % 20000  # one per job, so jobs sharing a node do not collide
        rendezvous = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head_node()}:{port}",
                      "--rdzv-id", f"baton-{job}"]
        srun = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                "--export=ALL"]
        return srun + torchrun(rendezvous, kind, spec_path, nproc_per_node, log_dir)


# ----------------------------------------------------------------- submit


def submit(manifest: Path, run_dir: Path | None = None, only: str | None = None, start: str | None = None) -> int:
    from launcher.pipeline import clear_stage, plan_run, record_manifest

    stages, run_dir, manifest, steps = plan_run(manifest, run_dir, only, start, nodes_available=None)
    todo = [s for s in steps if s.action != "skip"]
    if not todo:
        print(f"{run_dir}: nothing to submit; every selected stage is done and unchanged")
        return 0
    _require("sbatch")
    with ledger.Ledger(run_dir) as led:
        live = {name: e["slurm"]["job_id"] for name, e in led.data["stages"].items()
                if e.get("state") in ACTIVE and e.get("slurm") and job_states([e["slurm"]["job_id"]])}
        if live:
            raise BatonError(f"{run_dir}: jobs of this run are still queued or running "
                             f"({', '.join(f'{n}: {j}' for n, j in live.items())}); `baton cancel {run_dir}` first")
        record_manifest(led, stages, manifest, run_dir)
        submitted: dict[str, str] = {}
        for step in todo:
            r = step.stage
            folder = stage_dir(run_dir, r.name)
            if step.action != "resume":
                clear_stage(folder)
            script = write_script(r, run_dir)
            deps = [submitted[u] for u in r.upstream if u in submitted]
            argv = ["sbatch", "--parsable", *([f"--dependency=afterok:{':'.join(deps)}"] if deps else []), str(script)]
            out = subprocess.run(argv, capture_output=True, text=True)
            if out.returncode != 0:
                done = ", ".join(f"{n}: job {j}" for n, j in submitted.items()) or "none"
                raise BatonError(f"sbatch refused stage {r.name}: {out.stderr.strip()} (already submitted: {done})")
            job_id = out.stdout.strip().split(";")[0]
            entry = led.stage(r.name)
            ids = (entry.get("slurm") or {}).get("job_ids", [])
            entry.update(state="queued", kind=r.kind)
            entry["slurm"] = {"job_id": job_id, "job_ids": [*ids, job_id], "script": str(script),
                              "submitted": ledger.now(), "depends_on": deps}
            led.save()
            submitted[r.name] = job_id
            print(f"submitted {r.name}: job {job_id}", flush=True)
    return 0


def write_script(r: Resolved, run_dir: Path) -> Path:
    folder = stage_dir(run_dir, r.name) / "slurm"
    if "%" in str(folder):
        raise ConfigError(f"{folder}: Slurm reads % in a log path as a pattern (%j, %N …); "
                          "use a run folder and stage name without %")
    folder.mkdir(parents=True, exist_ok=True)
    preamble = Path(r.slurm["preamble"]).read_text() if r.slurm.get("preamble") else ""
    try:
        text = sbatch.render(
            job_name=f"baton.{r.base['run_name']}.{r.name}",
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
    from launcher.pipeline import run_stage

    run_dir = run_dir.resolve()
    data = ledger.read(run_dir)
    manifest = Path(data.get("manifest", ""))
    if not manifest.is_file() or file_digest(manifest) != data.get("manifest_digest"):
        raise ConfigError(f"{manifest}: changed or gone since `baton submit`; cancel and submit again")
    r = next((s for s in resolve(load(manifest)) if s.name == name), None)
    if r is None:
        raise ConfigError(f"{manifest}: no stage {name!r}")
    spec = build_spec(r, run_dir, outputs_of(data))
    if spec is None:
        raise ConfigError(f"stage {name}: its input stages ({', '.join(r.upstream)}) are not done")
    tag = complete_checkpoint(stage_dir(run_dir, name), spec["fingerprint"])
    step = Step(r, "resume" if tag else "run", f"job {os.environ.get('SLURM_JOB_ID')}", resume_tag=tag, spec=spec)
    job_id = os.environ["SLURM_JOB_ID"]
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    led = ledger.Ledger(run_dir, wait_s=LEDGER_WAIT_S)
    info = {"job_id": job_id, "restart": restart, "nodes": os.environ.get("SLURM_JOB_NODELIST")}
    code = run_stage(step, led, run_dir, SrunBackend(), attempt_info=info)
    if code != 75:
        return code
    state, _ = job_states([job_id]).get(job_id, ("", ""))
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
        entry["state"] = entry["attempts"][-1]["outcome"] = "requeued"
    print(f"== {name}: requeueing job {job_id} (restart {restart + 1} of at most {r.slurm['max_requeues']})", flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=False)
    return 0


# ----------------------------------------------------------------- status and cancel


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} for the jobs Slurm still knows (squeue, then scontrol show job)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    states: dict[str, tuple[str, str]] = {}
    out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        states[job] = (state, "" if reason in ("None", "(null)") else reason)
    for job in job_ids:
        if job in states:
            continue
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
        if "JobState" in fields:
            reason = fields.get("Reason", "")
            states[job] = (fields["JobState"], "" if reason in ("None", "(null)") else reason)
    forgotten = [job for job in job_ids if job not in states]
    if forgotten and shutil.which("sacct"):  # finished long ago: only accounting remembers, where it runs
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(forgotten), "-o", "JobID,State,Reason"],
                             capture_output=True, text=True)
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            job, state, reason = (line.split("|") + ["", ""])[:3]
            states[job] = (state, "" if reason in ("None", "(null)") else reason)
    return states


def slurm_column(entries: dict[str, dict[str, Any]]) -> dict[str, str]:
    """`12 RUNNING`, `13 PENDING (Dependency)` for each stage that has a job."""
    ids = {name: e["slurm"]["job_id"] for name, e in entries.items() if e.get("slurm")}
    states = job_states(list(ids.values()))
    out = {}
    for name, job in ids.items():
        state, reason = states.get(job, ("gone", ""))
        out[name] = f"{job} {state}" + (f" ({reason})" if reason else "")
    return out


def cancel(run_dir: Path) -> int:
    _require("scancel")
    run_dir = run_dir.resolve()
    with ledger.Ledger(run_dir, wait_s=LEDGER_WAIT_S) as led:
        jobs = {name: e["slurm"]["job_id"] for name, e in led.data["stages"].items()
                if e.get("state") in ACTIVE and e.get("slurm")}
        if not jobs:
            print(f"{run_dir}: no queued or running jobs")
            return 0
        subprocess.run(["scancel", *jobs.values()], check=False)
        for name, job in jobs.items():
            led.stage(name)["state"] = "cancelled"
            print(f"cancelled {name}: job {job}")
        led.save()
    return 0


def _require(command: str) -> None:
    if shutil.which(command) is None:
        raise BatonError(f"{command} not found: Slurm's client commands must be on PATH")
