"""What Slurm says about, and does to, a run's jobs: states (squeue, scontrol, sacct), requeue, cancel.

Each call checks what the Slurm command returned: a requeue or cancel that Slurm
refused must not be recorded as done. Every call goes through `calls.run` (a timeout,
and more tries while the controller is out of reach).
"""

from __future__ import annotations

import shutil
from typing import Any

from launcher.errors import BatonError
from launcher.slurm import calls

LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
        "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT")


def require(command: str) -> None:
    if shutil.which(command) is None:
        raise BatonError(f"{command} not found: Slurm's client commands must be on PATH")


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} for the jobs Slurm still knows (squeue, then scontrol show job, then sacct).

    Raises calls.NoAnswer when the controller does not answer."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    states: dict[str, tuple[str, str]] = {}
    out = calls.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], check=False)
    for line in out.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        states[job] = (state, _reason(reason))
    for job in job_ids:
        if job in states:
            continue
        out = calls.run(["scontrol", "-o", "show", "job", job], check=False)
        fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
        if "JobState" in fields:
            states[job] = (fields["JobState"], _reason(fields.get("Reason", "")))
    forgotten = [job for job in job_ids if job not in states]
    if forgotten and shutil.which("sacct"):  # finished long ago: only accounting remembers, where it runs
        try:
            out = calls.run(["sacct", "-X", "-n", "-P", "-j", ",".join(forgotten), "-o", "JobID,State,Reason"],
                            check=False)
        except calls.NoAnswer:  # the database is out of reach; the controller has said these jobs are not live
            return states
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            job, state, reason = (line.split("|") + ["", ""])[:3]
            states[job] = (state, _reason(reason))
    return states


def _reason(reason: str) -> str:
    return "" if reason in ("None", "(null)") else reason


def slurm_states(entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """{stage: {"job_id", "state", "reason"}} for each stage that has a job (state "gone": Slurm forgot it;
    "unknown": Slurm did not answer)."""
    ids = {name: e["slurm"]["job_id"] for name, e in entries.items() if e.get("slurm")}
    try:
        states = job_states(list(ids.values()))
    except calls.NoAnswer as e:  # a read-only view: say so, and show the rest of the run
        states = dict.fromkeys(ids.values(), ("unknown", f"no answer from Slurm: {e}"))
    out = {}
    for name, job in ids.items():
        state, reason = states.get(job, ("gone", ""))
        out[name] = {"job_id": job, "state": state} | ({"reason": reason} if reason else {})
    return out


def requeue(job_id: str) -> str | None:
    """`scontrol requeue`; None when Slurm took it, else what scontrol said (or why it could not answer)."""
    try:
        out = calls.run(["scontrol", "requeue", job_id], check=False)
    except calls.NoAnswer as e:
        return str(e)
    return None if out.returncode == 0 else (out.stderr.strip() or f"scontrol exited {out.returncode}")


def cancel(job_ids: list[str]) -> dict[str, str]:
    """scancel the jobs; {job id: problem} for those still live afterwards (scancel refused or failed).

    Raises calls.NoAnswer when the controller does not answer."""
    out = calls.run(["scancel", *job_ids], check=False)
    if out.returncode == 0:
        return {}
    said = out.stderr.strip() or f"scancel exited {out.returncode}"
    # scancel also fails for a job that ended meanwhile; only a job that is still live was not cancelled
    states = job_states(job_ids)
    return {job: f"{states[job][0]}; scancel: {said}" for job in job_ids
            if job in states and states[job][0] in LIVE}
