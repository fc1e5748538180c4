"""The Slurm back-end end to end, on a real one-node cluster (the `slurm_cluster` fixture).

`baton submit` queues one sbatch job per stage; inside each job baton runs the stage
with srun + torchrun and keeps the ledger. These tests wait for the jobs by reading
the ledger and `scontrol show job`, interrupt them the ways a cluster does (requeue,
the time-limit warning USR1), and compare against local `baton run`s of the same
manifests: the same lineage, and bitwise the same weights after a resume.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_BERT, baton, expected_decisions, gates_manifest, write_data
from tests.slurm.helpers import (
    ENDED,
    SLURM_DEFAULTS,
    assert_same_weights,
    assert_slurm_attempts,
    describe,
    final_weights,
    job_end,
    job_log,
    ledger,
    show_job,
    submit,
    wait_for_checkpoint,
    wait_states,
)

pytestmark = pytest.mark.slurm

STEPS = 300  # long enough (about 15 s) to interrupt mid-run, checkpoint every CKPT steps
CKPT = 30


# ----------------------------------------------------------------- helpers


def lineage(run_dir: Path) -> dict[str, dict]:
    """Per stage: fingerprint, the digests of its inputs (paths of upstream folders differ by run) and of its output."""
    out = {}
    for name, e in ledger(run_dir)["stages"].items():
        inputs = {k: v["digest"] for k, v in e["inputs"].items() if k != "data"}
        out[name] = {"fingerprint": e["fingerprint"], "inputs": inputs, "data": e["inputs"]["data"],
                     "output": e["output"]["digest"]}
    return out


def refusing(command: str, verb: str, folder: Path, env: dict[str, str]) -> dict[str, str]:
    """`env` with a `command` on PATH that fails when its first argument is `verb` (as Slurm refuses a
    request it cannot honour) and runs the real command otherwise."""
    import shutil

    real = shutil.which(command, path=env.get("PATH"))
    assert real, command
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / command
    shim.write_text(f"""#!/bin/bash
if [[ "$1" == {verb} || {json.dumps(verb)} == "*" ]]; then
  echo "{command}: error: Access/permission denied (test)" >&2; exit 1
fi
exec {real} "$@"
""")
    shim.chmod(0o755)
    return env | {"PATH": f"{folder}{os.pathsep}{env.get('PATH', '')}"}


def stop_step(run_dir: Path, env: dict[str, str], timeout: float = 120) -> int:
    """The step a stop (USR1, SIGTERM) saved, from the stage's "stop" record, once written."""
    records = run_dir / "stages" / "mlm" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = records.read_text().splitlines() if records.exists() else []
        stops = [r["step"] for r in map(json.loads, lines) if r["event"] == "stop"]
        if stops:
            return stops[0]
        time.sleep(0.1)
    raise AssertionError(f"the stage recorded no stop\n{describe(run_dir, env)}")


# ----------------------------------------------------------------- manifests and shared runs


def two_stage_manifest() -> str:
    return f"""version: 1
run: {{name: slurm-two}}
defaults:
  launcher: {{nproc_per_node: 2}}
  deepspeed: {{config: zero2}}
  seed: 7
{SLURM_DEFAULTS}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: data/pretrain.txt}}
    sentencepiece: {{vocab_size: 600}}
  - name: mlm
    kind: mlm
    init:
{TINY_BERT}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt, eval: data/pretrain_eval.txt, max_length: 32}}
    train: {{max_steps: 24, micro_batch_size: 16, lr: 1.0e-3, warmup_steps: 4}}
    checkpoint: {{every_steps: 8, keep_last: 2}}
    slurm: {{time: "00:15:00"}}
"""


def long_mlm_manifest(tokenizer: Path) -> str:
    return f"""version: 1
run: {{name: slurm-long}}
defaults:
  launcher: {{nproc_per_node: 2}}
  deepspeed: {{config: zero2}}
  seed: 11
{SLURM_DEFAULTS}
stages:
  - name: mlm
    kind: mlm
    init:
{TINY_BERT}
    tokenizer: {{pretrained: {json.dumps(str(tokenizer))}}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: {STEPS}, micro_batch_size: 8, grad_accum: 2, lr: 1.0e-3, warmup_steps: 5, schedule: cosine,
             log_every: 50}}
    checkpoint: {{every_steps: {CKPT}, keep_last: 2}}
    eval: {{at_end: false}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slurm-e2e")
    write_data(folder / "data")
    (folder / "two.yaml").write_text(two_stage_manifest())
    return folder


@pytest.fixture(scope="module")
def local_two(root: Path, hf_env: dict[str, str]) -> Path:
    """The two-stage manifest run locally (`baton run`): the lineage to match, and a tokenizer to share."""
    run_dir = root / "local-two"
    baton("run", root / "two.yaml", "--run-dir", run_dir, env=hf_env)
    return run_dir


@pytest.fixture(scope="module")
def long_mlm(root: Path, local_two: Path, hf_env: dict[str, str]) -> dict:
    """A one-stage mlm manifest long enough to interrupt, and the weights of its uninterrupted local run."""
    manifest = root / "long.yaml"
    manifest.write_text(long_mlm_manifest(local_two / "stages" / "tokenizer" / "final"))
    run_dir = root / "local-long"
    baton("run", manifest, "--run-dir", run_dir, env=hf_env)
    return {"manifest": manifest, "weights": final_weights(run_dir)}


# ----------------------------------------------------------------- tests


def test_submitted_pipeline_has_the_lineage_of_a_local_run(slurm_cluster: dict, root: Path, local_two: Path) -> None:
    env = slurm_cluster["env"]
    run_dir = root / "slurm-two"
    jobs = submit(root / "two.yaml", run_dir, env, cwd=root)
    assert list(jobs) == ["tokenizer", "mlm"]

    queued = ledger(run_dir)["stages"]
    for name, job_id in jobs.items():
        slurm = queued[name]["slurm"]
        assert slurm["job_id"] == job_id and slurm["job_ids"] == [job_id]
        assert slurm["script"] == str(run_dir / "stages" / name / "slurm" / "job.sbatch")
        assert Path(slurm["script"]).is_file()
    # the chain and the manifest's settings as Slurm sees them (defaults.slurm, mlm overriding the time)
    mlm = show_job(jobs["mlm"], env)
    assert f"afterok:{jobs['tokenizer']}" in mlm.get("Dependency", "") or mlm.get("JobState") != "PENDING", mlm
    for name, limit in (("tokenizer", "00:10:00"), ("mlm", "00:15:00")):
        job = show_job(jobs[name], env)
        assert job["TimeLimit"] == limit and job["Partition"] == "debug", job
        assert job["MinMemoryNode"] == "2G" and job["MinCPUsNode"] == "2", job
        assert job["Requeue"] == "1", job

    # while the jobs are queued or run, `status --json` reads the run folder and asks Slurm for their states
    live = {s["name"]: s for s in json.loads(baton("status", run_dir, "--json", env=env).stdout)["stages"]}
    assert {n: s["slurm"]["job_id"] for n, s in live.items()} == jobs
    assert all(s["slurm"]["state"] for s in live.values()), live
    stages = wait_states(run_dir, env, {"tokenizer": {"done", "failed"}, "mlm": {"done", "failed"}})
    assert {n: e["state"] for n, e in stages.items()} == {"tokenizer": "done", "mlm": "done"}, describe(run_dir, env)
    for name, job_id in jobs.items():
        assert_slurm_attempts(stages[name], job_id)
        assert stages[name]["attempts"][-1]["outcome"] == "done"
        assert stages[name]["attempts"][-1]["restart"] == 0
        assert job_log(run_dir, name, job_id).strip(), f"job {job_id} wrote no output"
    # a job's log is no terminal: rank 0's lines, each with the time and the stage
    assert re.search(r"^\d\d:\d\d:\d\d mlm \| step \d+/\d+  loss ", job_log(run_dir, "mlm", jobs["mlm"]), re.M)
    for job_id in jobs.values():  # Slurm agrees: both jobs completed with exit code 0
        job = job_end(job_id, env)
        assert job.get("JobState") == "COMPLETED" and job.get("ExitCode") == "0:0", job

    assert lineage(run_dir) == lineage(local_two)
    status = baton("status", run_dir, env=env).stdout
    assert "slurm" in status.splitlines()[1] and f"{jobs['mlm']} COMPLETED" in status, status


@pytest.mark.full  # the decisions are proven local (tests/test_decisions.py); here only their replay under submit
def test_the_same_decisions_under_submit(slurm_cluster: dict, root: Path, gates_run: dict) -> None:
    """Every instance is a job; each takes the decisions recorded so far (replayed, never taken again) and one that a
    decision made unneeded (last@2: last passed its gate) exits 0, so the afterok chain goes on."""
    env = slurm_cluster["env"]
    (root / "gates.yaml").write_text(gates_manifest(SLURM_DEFAULTS))
    run_dir = root / "slurm-gates"
    jobs = submit(root / "gates.yaml", run_dir, env, cwd=root)
    assert list(jobs) == ["tokenizer", "pretrain", "pretrain@2", "finetune@v1", "finetune@v2", "prune", "last",
                          "last@2"]
    prune = show_job(jobs["prune"], env).get("Dependency", "")
    assert all(jobs[v] in prune for v in ("finetune@v1", "finetune@v2")) or not prune, prune

    ended = {"done", "failed", "skipped"}
    stages = wait_states(run_dir, env, {name: ended for name in jobs}, timeout=600)
    assert {n: e["state"] for n, e in stages.items()} == {n: "skipped" if n == "last@2" else "done" for n in jobs}, \
        describe(run_dir, env)
    for job_id in jobs.values():
        job = job_end(job_id, env)
        assert job.get("JobState") == "COMPLETED" and job.get("ExitCode") == "0:0", job
    assert stages["last@2"]["skipped"] == "not needed: last passed its gate"
    led = ledger(run_dir)
    assert expected_decisions(led) == expected_decisions(ledger(gates_run["run_dir"]))
    assert "prune: hands on" in baton("status", run_dir, env=env).stdout


def test_usr1_then_a_requeue_mid_training_resume_to_the_same_weights(slurm_cluster: dict, root: Path,
                                                                    long_mlm: dict) -> None:
    """One job stopped twice: the time-limit warning (USR1) makes the stage checkpoint and requeue itself; in the
    requeued run, `scontrol requeue` (an admin, a failed node) stops it again mid-training. Each run resumes from the
    newest checkpoint, and the weights are bitwise those of an uninterrupted run."""
    env = slurm_cluster["env"]
    run_dir = root / "slurm-requeue"
    job_id = submit(long_mlm["manifest"], run_dir, env, cwd=root)["mlm"]
    wait_for_checkpoint(run_dir, "mlm", env, min_step=CKPT)
    # what Slurm sends signal_before_s before the time limit (--signal=B:USR1@...), sent now
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    stopped = stop_step(run_dir, env)
    assert stopped < STEPS
    step = wait_for_checkpoint(run_dir, "mlm", env, min_step=stopped + 1, requeued=True)  # by the requeued run
    subprocess.run(["scontrol", "requeue", job_id], env=env, check=True)

    entry = wait_states(run_dir, env, {"mlm": {"done", "failed"}})["mlm"]
    story = describe(run_dir, env)
    assert entry["state"] == "done", story
    assert_slurm_attempts(entry, job_id)
    attempts = entry["attempts"]
    assert [(a["restart"], a["outcome"]) for a in (attempts[0], attempts[-1])] == [(0, "requeued"), (2, "done")], story
    assert attempts[1]["restart"] == 1 and attempts[1]["resumed_from"] == f"step{stopped:08d}", story
    resumed = int(attempts[-1]["resumed_from"].removeprefix("step"))
    assert step <= resumed < STEPS, story
    assert job_log(run_dir, "mlm", job_id).count("== mlm (mlm):") >= 3, "the requeued runs did not append to the log"
    assert job_end(job_id, env).get("Restarts") == "2"
    assert_same_weights(long_mlm["weights"], final_weights(run_dir))


def test_refused_requeue_fails_the_job_and_the_stage_resumes_later(slurm_cluster: dict, root: Path,
                                                                   long_mlm: dict) -> None:
    """The job must not end COMPLETED after a requeue Slurm refused: its afterok dependants would start."""
    env = refusing("scontrol", "requeue", root / "shim-scontrol", slurm_cluster["env"])
    run_dir = root / "slurm-requeue-refused"
    job_id = submit(long_mlm["manifest"], run_dir, env, cwd=root)["mlm"]
    wait_for_checkpoint(run_dir, "mlm", env, min_step=CKPT)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)

    job = job_end(job_id, env, timeout=120)
    story = describe(run_dir, env)
    assert job.get("JobState") == "FAILED" and job.get("ExitCode") == "75:0", f"{job}\n{story}"
    entry = ledger(run_dir)["stages"]["mlm"]
    assert entry["state"] == "preempted" and entry["attempts"][-1]["outcome"] == "preempted", story
    assert "refused the requeue" in job_log(run_dir, "mlm", job_id), story

    # what the message says: running it again resumes from the checkpoint (a resume's weights: the test above)
    tag = (run_dir / "stages" / "mlm" / "ckpt" / "LATEST").read_text().strip()
    plan = baton("run", long_mlm["manifest"], "--run-dir", run_dir, "--dry-run", env=slurm_cluster["env"],
                 cwd=root).stdout
    assert f"preempted; resume from {tag}" in plan, plan


def test_failed_stage_gets_its_dependant_cancelled(slurm_cluster: dict, root: Path, local_two: Path) -> None:
    env = slurm_cluster["env"]
    tokenizer = local_two / "stages" / "tokenizer" / "final"
    manifest = root / "bad.yaml"
    # a label outside data.labels past the rows validate samples: the stage finds it (exit 2), not the submit
    rows = [{"text": f"a gloss {i}", "label": "alpha" if i % 2 else "beta"} for i in range(150)]
    (root / "data" / "bad_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                           [*rows, {"text": "a leaf", "label": "plant"}]))
    manifest.write_text(f"""version: 1
run: {{name: slurm-bad}}
defaults:
  launcher: {{nproc_per_node: 2}}
{SLURM_DEFAULTS}
stages:
  - name: bad
    kind: classify
    init:
{TINY_BERT}
    tokenizer: {{pretrained: {json.dumps(str(tokenizer))}}}
    data: {{train: data/bad_train.jsonl, labels: [alpha, beta], max_length: 32}}
    train: {{max_steps: 2, micro_batch_size: 4}}
  - name: after
    kind: classify
    init: {{from: bad}}
    data: {{train: data/train.jsonl, max_length: 32}}
    train: {{max_steps: 2, micro_batch_size: 4}}
""")
    run_dir = root / "slurm-bad"
    jobs = submit(manifest, run_dir, env, cwd=root)
    stages = wait_states(run_dir, env, {"bad": {"done", "failed"}}, timeout=180)
    story = describe(run_dir, env)
    assert stages["bad"]["state"] == "failed", story
    assert "alpha" in (stages["bad"]["attempts"][-1].get("error") or ""), story  # found by the stage: exit 2
    assert job_end(jobs["bad"], env).get("JobState") == "FAILED", story

    deadline = time.monotonic() + 60  # kill_invalid_depend: Slurm cancels the dependant, it does not pend forever
    while show_job(jobs["after"], env).get("JobState") == "PENDING" and time.monotonic() < deadline:
        time.sleep(1)
    after = show_job(jobs["after"], env)
    assert after.get("JobState") == "CANCELLED", f"{after}\n{describe(run_dir, env)}"
    pending = subprocess.run(["squeue", "-h", "-j", ",".join(jobs.values())], env=env, capture_output=True, text=True)
    assert not pending.stdout.strip(), pending.stdout
    status = baton("status", run_dir, env=env).stdout
    assert f"{jobs['after']} CANCELLED" in status and f"{jobs['bad']} FAILED" in status, status
    assert ledger(run_dir)["stages"]["after"]["attempts"] == []  # it never ran


def test_shell_metacharacters_in_names_and_paths_reach_no_shell(slurm_cluster: dict, root: Path, local_two: Path,
                                                                 tmp_path: Path) -> None:
    env = slurm_cluster["env"]
    stage = "x$(touch PWNED);y"
    data = tmp_path / "d a't\"a$(touch PWNED)"
    data.mkdir()
    lines = (root / "data" / "pretrain.txt").read_text().splitlines()
    (data / "pretrain.txt").write_text("\n".join(lines[:600]) + "\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""version: 1
run: {{name: "q`touch PWNED`"}}
defaults:
  launcher: {{nproc_per_node: 2}}
{SLURM_DEFAULTS}
stages:
  - name: {json.dumps(stage)}
    kind: tokenizer
    data: {{train: {json.dumps(str(data / 'pretrain.txt'))}}}
    sentencepiece: {{vocab_size: 300}}
  - name: "m;`touch PWNED` $(touch PWNED)"
    kind: mlm
    init:
{TINY_BERT}
    tokenizer: {{from: {json.dumps(stage)}}}
    data: {{train: {json.dumps(str(data / 'pretrain.txt'))}, max_length: 32}}
    train: {{max_steps: 4, micro_batch_size: 8}}
    eval: {{at_end: false}}
""")
    run_dir = tmp_path / "run $(touch PWNED) 'r' $HOME"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    jobs = submit(manifest, run_dir, env, cwd=cwd)
    assert len(jobs) == 2 and stage in jobs, jobs
    stages = wait_states(run_dir, env, {name: {"done", "failed"} for name in jobs})
    story = describe(run_dir, env)
    assert all(e["state"] == "done" for e in stages.values()), story
    assert (run_dir / "stages" / stage / "final").is_dir()
    assert list(stages[stage]["inputs"]["data"]) == [str(data / "pretrain.txt")]
    for name, job_id in jobs.items():
        assert stages[name]["slurm"]["script"] == str(run_dir / "stages" / name / "slurm" / "job.sbatch")
        assert job_log(run_dir, name, job_id).strip()

    found = []
    deep = [tmp_path.parent, slurm_cluster["dir"], ROOT]  # pytest's temp folders (run, data, cwd, cluster), the repo
    for top in deep:
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not (folder == str(ROOT) and d in (".venv", ".git"))]
            found += [Path(folder, f) for f in files + dirs if f == "PWNED"]
    found += [p for top in (Path("/tmp"), Path.home(), Path("/")) for p in top.glob("PWNED")]
    assert not found, f"a shell ran a name: {found}"


def test_status_shows_the_queue_and_cancel_stops_the_run_for_good(slurm_cluster: dict, root: Path,
                                                                 long_mlm: dict) -> None:
    env = slurm_cluster["env"]
    manifest = root / "cancel.yaml"
    manifest.write_text(long_mlm["manifest"].read_text() + """  - name: after
    kind: mlm
    init: {from: mlm}
    data: {train: data/pretrain.txt, max_length: 32}
    train: {max_steps: 4, micro_batch_size: 8}
""")
    run_dir = root / "slurm-cancel"
    jobs = submit(manifest, run_dir, env, cwd=root)
    wait_for_checkpoint(run_dir, "mlm", env, min_step=CKPT)  # mid-training: the stage has something to save
    status = baton("status", run_dir, env=env).stdout
    # the reason may be cut to fit 80 columns
    assert f"{jobs['mlm']} RUNNING" in status and f"{jobs['after']} PENDING (Depend" in status, status

    # a cancel that Slurm refuses is an error, and the stages stay live in the ledger
    refused = baton("cancel", run_dir, env=refusing("scancel", "*", root / "shim-scancel", env), check=False)
    assert refused.returncode != 0 and "still live" in refused.stderr, refused.stderr
    assert f"not cancelled mlm: job {jobs['mlm']} is RUNNING" in refused.stderr, refused.stderr
    assert {e["state"] for e in ledger(run_dir)["stages"].values()} <= {"queued", "running"}

    out = baton("cancel", run_dir, env=env).stdout
    assert jobs["mlm"] in out and jobs["after"] in out, out
    # the cancelled stage checkpoints on its way out but must not requeue itself: watched until 12 s after it ended
    # (cred_expire is 10 s here), 40 s at most
    seen: list[str] = []
    deadline, ended_at = time.monotonic() + 40, None
    while time.monotonic() < min(deadline, (ended_at or deadline) + 12):
        seen.append(show_job(jobs["mlm"], env).get("JobState", "?"))
        if ended_at is None and seen[-1] in ENDED:
            ended_at = time.monotonic()
        time.sleep(1)
    story = describe(run_dir, env)
    first_end = next((i for i, s in enumerate(seen) if s in ENDED), None)
    assert first_end is not None and set(seen[first_end:]) == {"CANCELLED"}, f"{seen}\n{story}"
    assert job_end(jobs["after"], env).get("JobState") == "CANCELLED", story
    pending = subprocess.run(["squeue", "-h", "-j", ",".join(jobs.values())], env=env, capture_output=True, text=True)
    assert not pending.stdout.strip(), pending.stdout
    states = {n: e["state"] for n, e in ledger(run_dir)["stages"].items()}
    assert not set(states.values()) & {"queued", "running", "requeued"}, f"{states}\n{story}"
    status = baton("status", run_dir, env=env).stdout
    assert f"{jobs['mlm']} CANCELLED" in status and f"{jobs['after']} CANCELLED" in status, status


def test_whole_manifest_inside_one_allocation(slurm_cluster: dict, root: Path, local_two: Path) -> None:
    """launcher/slurm/allocation.sbatch: `baton run` inside the job sees SLURM_JOB_ID and starts each stage with
    srun."""
    env = slurm_cluster["env"] | {"BATON": str(Path(sys.executable).parent / "baton")}
    run_dir = root / "allocation"
    script = ROOT / "launcher" / "slurm" / "allocation.sbatch"
    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--chdir={root}", "--output=allocation-%j.out",
                          str(script), "two.yaml", "--run-dir", str(run_dir)],
                         env=env, capture_output=True, text=True, check=True)
    job_id = out.stdout.strip().split(";")[0]
    job = job_end(job_id, env, timeout=300)
    story = describe(run_dir, env) + (root / f"allocation-{job_id}.out").read_text(errors="replace")[-4000:]
    assert job.get("JobState") == "COMPLETED", f"{job}\n{story}"
    stages = ledger(run_dir)["stages"]
    for entry in stages.values():
        assert [(a["backend"], a["job_id"], a["outcome"]) for a in entry["attempts"]] == [("slurm", job_id, "done")]
        assert entry["attempts"][0]["command"][0] == "srun", entry["attempts"][0]["command"]
    assert lineage(run_dir) == lineage(local_two)


def test_an_sbatch_that_queued_its_job_and_timed_out_is_not_run_again(slurm_cluster: dict, tmp_path: Path) -> None:
    """`calls.sbatch_once` against the real squeue: an sbatch that queues its job, then hangs past the timeout, is
    not run again; the job it queued is found by its name (and this user) and taken."""
    import shutil

    from launcher.slurm import calls

    env = slurm_cluster["env"]
    real = shutil.which("sbatch", path=env.get("PATH"))
    assert real
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "sbatch").write_text(f'#!/bin/bash\necho "$*" >> {shim}/sbatch.calls\n{real} "$@"\nexec sleep 60\n')
    (shim / "sbatch").chmod(0o755)
    name = f"baton.once.{os.getpid()}"
    script = tmp_path / "job.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --partition=debug\n#SBATCH --time=00:01:00\n"
                      f"#SBATCH --mem=100M\n#SBATCH --output={tmp_path}/job-%j.out\nsleep 1\n")
    job = calls.sbatch_once(["sbatch", "--parsable", str(script)], name, timeout_s=8, backoff_s=1,
                            env=env | {"PATH": f"{shim}{os.pathsep}{env.get('PATH', '')}"})
    assert (shim / "sbatch.calls").read_text().count("\n") == 1
    assert show_job(job, env).get("JobName") == name
