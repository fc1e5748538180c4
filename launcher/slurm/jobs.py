"""What Slurm says about, and does to, a run's jobs: states (squeue, scontrol, sacct), requeue, cancel.

Each call checks what the Slurm command returned: a requeue or cancel that Slurm
refused must not be recorded as done.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from launcher.errors import BatonError

LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
        "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT")


def require(command: str) -> None:
    if shutil.which(command) is None:
        raise BatonError(f"{command} not found: Slurm's client commands must be on PATH")


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} for the jobs Slurm still knows (squeue, then scontrol show job, then sacct)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    states: dict[str, tuple[str, str]] = {}
    out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        states[job] = (state, _reason(reason))
    for job in job_ids:
        if job in states:
            continue
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
        if "JobState" in fields:
            states[job] = (fields["JobState"], _reason(fields.get("Reason", "")))
    forgotten = [job for job in job_ids if job not in states]
    if forgotten and shutil.which("sacct"):  # finished long ago: only accounting remembers, where it runs
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(forgotten), "-o", "JobID,State,Reason"],
                             capture_output=True, text=True)
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            job, state, reason = (line.split("|") + ["", ""])[:3]
            states[job] = (state, _reason(reason))
    return states


def _reason(reason: str) -> str:
    return "" if reason in ("None", "(null)") else reason


def slurm_states(entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """{stage: {"job_id", "state", "reason"}} for each stage that has a job (state "gone": Slurm forgot it)."""
    ids = {name: e["slurm"]["job_id"] for name, e in entries.items() if e.get("slurm")}
    states = job_states(list(ids.values()))
    out = {}
    for name, job in ids.items():
        state, reason = states.get(job, ("gone", ""))
        out[name] = {"job_id": job, "state": state} | ({"reason": reason} if reason else {})
    return out


def requeue(job_id: str) -> str | None:
    """`scontrol requeue`; None when Slurm took it, else what scontrol said."""
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    return None if out.returncode == 0 else (out.stderr.strip() or f"scontrol exited {out.returncode}")


def cancel(job_ids: list[str]) -> dict[str, str]:
    """scancel the jobs; {job id: problem} for those still live afterwards (scancel refused or failed)."""
    out = subprocess.run(["scancel", *job_ids], capture_output=True, text=True)
    if out.returncode == 0:
        return {}
    said = out.stderr.strip() or f"scancel exited {out.returncode}"
    # scancel also fails for a job that ended meanwhile; only a job that is still live was not cancelled
    states = job_states(job_ids)
    return {job: f"{states[job][0]}; scancel: {said}" for job in job_ids
            if job in states and states[job][0] in LIVE}
