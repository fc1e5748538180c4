"""What the Slurm tests share: submit a manifest, wait on the ledger and on Slurm, and tell the whole story
of a run that did not go as expected."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from tests.conftest import baton

SLURM_DEFAULTS = """  slurm:
    partition: debug
    time: "00:10:00"
    mem: 2G
    cpus_per_task: 2
    extra: {comment: "baton test"}"""


def ledger(run_dir: Path) -> dict:
    return json.loads((run_dir / "ledger.json").read_text())


def show_job(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once Slurm has forgotten the job)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def describe(run_dir: Path, env: dict[str, str]) -> str:
    """Everything that explains a stuck or failed run: ledger, queue, each job's output."""
    parts = [f"--- {run_dir / 'ledger.json'}"]
    try:
        parts.append((run_dir / "ledger.json").read_text()[-6000:])
    except OSError as e:
        parts.append(str(e))
    squeue = subprocess.run(["squeue", "-o", "%i %j %T %r"], env=env, capture_output=True, text=True)
    parts += ["--- squeue", squeue.stdout + squeue.stderr]
    for out in sorted(run_dir.glob("stages/*/slurm/job-*.out")):
        parts += [f"--- {out}", out.read_text(errors="replace")[-4000:]]
    return "\n".join(parts)


def submit(manifest: Path, run_dir: Path, env: dict[str, str], cwd: Path) -> dict[str, str]:
    """`baton submit`; returns {stage: job id} from its output."""
    t0 = time.monotonic()
    out = baton("submit", manifest, "--run-dir", run_dir, env=env, cwd=cwd, timeout=120).stdout
    jobs = dict(re.findall(r"^submitted (.+): job (\d+)$", out, re.M))
    assert jobs, out
    print(f"submit took {time.monotonic() - t0:.1f} s: {jobs}")
    return jobs


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_states(run_dir: Path, env: dict[str, str], want: dict[str, set[str]], timeout: float = 300) -> dict:
    """Poll the ledger until every named stage is in one of its wanted states, or until Slurm has ended
    the jobs of those that are not (twice in a row: a requeue passes through short states); then return
    the ledger's stages. Fail with the whole story after `timeout`."""
    deadline = time.monotonic() + timeout
    ended_before = False
    while time.monotonic() < deadline:
        if (run_dir / "ledger.json").exists():
            stages = ledger(run_dir)["stages"]
            waiting = [n for n, states in want.items() if stages.get(n, {}).get("state") not in states]
            if not waiting:
                return stages
            jobs = [(stages.get(n, {}).get("slurm") or {}).get("job_id") for n in waiting]
            ended = all(job and show_job(job, env).get("JobState") in ENDED for job in jobs)
            if ended and ended_before:
                return ledger(run_dir)["stages"]
            ended_before = ended
        time.sleep(1)
    raise AssertionError(f"stages not {want} after {timeout} s\n{describe(run_dir, env)}")


def job_end(job_id: str, env: dict[str, str], timeout: float = 60) -> dict[str, str]:
    """`scontrol show job` once the job has ended (the ledger is final a moment before the job exits)."""
    deadline = time.monotonic() + timeout
    while (job := show_job(job_id, env)).get("JobState") not in ENDED and time.monotonic() < deadline:
        time.sleep(0.5)
    return job


def wait_for_checkpoint(run_dir: Path, stage: str, env: dict[str, str], min_step: int, timeout: float = 240,
                        requeued: bool = False) -> int:
    """The step of the newest complete checkpoint once it is at least `min_step` (the stage must still run; or, when
    `requeued`, be on its way back: stopped and requeued)."""
    live = ("queued", "running") + (("preempted", "requeued") if requeued else ())
    latest = run_dir / "stages" / stage / "ckpt" / "LATEST"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest.exists():
            tag = latest.read_text().strip()
            try:
                step = json.loads((latest.parent / tag / "COMPLETE").read_text())["step"]
            except (OSError, ValueError):  # replaced under our feet by a newer one
                continue
            if step >= min_step:
                return step
        state = ledger(run_dir)["stages"].get(stage, {}).get("state") if (run_dir / "ledger.json").exists() else None
        assert state in (None, *live), f"stage left before an interruption\n{describe(run_dir, env)}"
        time.sleep(0.05)
    raise AssertionError(f"no complete checkpoint at step >= {min_step}\n{describe(run_dir, env)}")


def final_weights(run_dir: Path, stage: str = "mlm") -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "stages" / stage / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ (bitwise) in {different[:5]}"


def assert_slurm_attempts(entry: dict, job_id: str) -> None:
    assert entry["slurm"]["job_id"] == job_id
    assert entry["slurm"]["job_ids"] == [job_id]
    for attempt in entry["attempts"]:
        assert attempt["backend"] == "slurm" and str(attempt["job_id"]) == job_id, attempt


def job_log(run_dir: Path, stage: str, job_id: str) -> str:
    return (run_dir / "stages" / stage / "slurm" / f"job-{job_id}.out").read_text(errors="replace")
