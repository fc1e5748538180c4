"""Every Slurm client call has a timeout and a bounded number of tries; sbatch is never run twice for one job.

The Slurm commands here are small shell scripts on PATH that answer as a busy or unreachable controller does
(Slurm's own words, a hang past the timeout), each writing down how it was called; the code under test is the real
`launcher.slurm.calls`, `launcher.slurm.jobs` and the allocation script. The Slurm tests (tests/slurm) run the same
code against a real cluster.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from launcher.errors import BatonError
from launcher.slurm import calls, jobs
from launcher.slurm.sbatch import render
from tests.conftest import ROOT

TIMED_OUT = "slurm_load_jobs error: Socket timed out on send/recv operation"
UNKNOWN_JOB = "slurm_load_jobs error: Invalid job id specified"
FAST = {"timeout_s": 0.5, "backoff_s": 0.01}  # a hang costs half a second, a pause nothing


def fake(folder: Path, command: str, body: str) -> Path:
    """An executable `command` in `folder` that appends its arguments to `folder`/<command>.calls, then runs
    `body` (bash; $n is how many times it has been called, this time included)."""
    log = folder / f"{command}.calls"
    path = folder / command
    path.write_text(f'#!/bin/bash\necho "$*" >> {shlex.quote(str(log))}\nn=$(wc -l < {shlex.quote(str(log))})\n'
                    + body)
    path.chmod(0o755)
    return path


def called(folder: Path, command: str) -> list[str]:
    log = folder / f"{command}.calls"
    return log.read_text().splitlines() if log.exists() else []


def on_path(folder: Path) -> dict[str, str]:
    return os.environ | {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def failing(times: int, said: str, then: str) -> str:
    """A body that fails the first `times` calls saying `said`, then prints `then`."""
    return (f'if [ "$n" -le {times} ]; then echo "$(basename "$0"): error: {said}" >&2; exit 1; fi\n'
            f'echo {shlex.quote(then)}\n')


# ----------------------------------------------------------------- calls.run


def test_a_transient_failure_is_tried_again_until_slurm_answers(tmp_path: Path) -> None:
    fake(tmp_path, "squeue", failing(2, TIMED_OUT, "42|RUNNING|None"))
    out = calls.run(["squeue", "-h", "-j", "42"], tries=4, env=on_path(tmp_path), **FAST)
    assert out.stdout.strip() == "42|RUNNING|None"
    assert called(tmp_path, "squeue") == ["-h -j 42"] * 3


@pytest.mark.parametrize("said", [TIMED_OUT, "Unable to contact slurm controller (connect failure)",
                                  "Problem talking to the database: Connection refused"])
def test_a_failure_that_stays_transient_ends_after_the_tries(tmp_path: Path, said: str) -> None:
    fake(tmp_path, "squeue", failing(99, said, ""))
    with pytest.raises(calls.NoAnswer) as raised:
        calls.run(["squeue", "-h"], tries=3, env=on_path(tmp_path), **FAST)
    assert len(called(tmp_path, "squeue")) == 3
    assert str(raised.value).startswith("squeue -h: squeue: error: ") and said in str(raised.value)
    assert "(3 tries)" in str(raised.value)


def test_a_hung_command_is_killed_at_the_timeout_and_tried_again(tmp_path: Path) -> None:
    fake(tmp_path, "scontrol", "exec sleep 30\n")
    t0 = time.monotonic()
    with pytest.raises(calls.NoAnswer, match=r"scontrol requeue 7: no answer in 0\.5 s \(2 tries\)"):
        calls.run(["scontrol", "requeue", "7"], tries=2, env=on_path(tmp_path), **FAST)
    assert time.monotonic() - t0 < 10
    assert called(tmp_path, "scontrol") == ["requeue 7"] * 2


def test_a_hang_then_an_answer(tmp_path: Path) -> None:
    fake(tmp_path, "sacct", 'if [ "$n" -eq 1 ]; then exec sleep 30; fi\necho "9|COMPLETED|None"\n')
    assert calls.run(["sacct", "-j", "9"], tries=2, env=on_path(tmp_path), **FAST).stdout == "9|COMPLETED|None\n"


def test_slurms_answer_is_not_tried_again(tmp_path: Path) -> None:
    """A failure that is not transient is what Slurm says (here: a job it does not know); "slurm_load_jobs error"
    heads it as it heads a timeout."""
    fake(tmp_path, "squeue", failing(99, UNKNOWN_JOB, ""))
    with pytest.raises(BatonError) as raised:
        calls.run(["squeue", "-h", "-j", "9"], env=on_path(tmp_path), **FAST)
    assert not isinstance(raised.value, calls.NoAnswer)
    assert str(raised.value) == f"squeue -h -j 9: squeue: error: {UNKNOWN_JOB}"
    out = calls.run(["squeue", "-h", "-j", "9"], check=False, env=on_path(tmp_path), **FAST)
    assert out.returncode == 1 and UNKNOWN_JOB in out.stderr
    assert len(called(tmp_path, "squeue")) == 2  # once each


def test_a_missing_command_is_named(tmp_path: Path) -> None:
    with pytest.raises(BatonError, match="scancel not found: Slurm's client commands must be on PATH"):
        calls.run(["scancel", "1"], env={"PATH": str(tmp_path)}, **FAST)


def test_the_timeout_can_be_set_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATON_SLURM_TIMEOUT_S", raising=False)
    assert calls.default_timeout() == calls.TIMEOUT_S == 30
    monkeypatch.setenv("BATON_SLURM_TIMEOUT_S", "120")
    assert calls.default_timeout() == 120
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv("BATON_SLURM_TIMEOUT_S", bad)
        with pytest.raises(BatonError, match="BATON_SLURM_TIMEOUT_S"):
            calls.default_timeout()


# ----------------------------------------------------------------- sbatch: never twice for one job

NAME = "baton.run.pretrain.a1b2c3"


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "job.sbatch"
    path.write_text(render(job_name=NAME, nodes=1, output=f"{tmp_path}/job-%j.out",
                           settings={"signal_before_s": 120, "max_requeues": 3}, command=["true"]))
    return path


def slurm_with_queue(folder: Path, sbatch: str) -> None:
    """A queue (folder/queue: "<job id> <name>" lines), an squeue that lists this user's jobs of a --name from it,
    and an sbatch that runs `sbatch` ($name: the job name its script gives; `queue ID` queues it as job ID)."""
    queue = shlex.quote(str(folder / "queue"))
    fake(folder, "squeue", f"""touch {queue}
for a in "$@"; do case $a in --name=*) want=${{a#--name=}} ;; --user=*) user=${{a#--user=}} ;; esac; done
[ "$user" = "$(id -u)" ] || {{ echo "squeue: error: expected --user=$(id -u)" >&2; exit 1; }}
while read -r id name; do [ "$name" = "$want" ] && echo "$id"; done < {queue}
exit 0
""")
    fake(folder, "sbatch", f"""name=$(sed -n 's/^#SBATCH --job-name=//p' "${{@: -1}}")
queue() {{ echo "$1 $name" >> {queue}; }}
{sbatch}""")


def test_sbatch_that_queued_the_job_but_timed_out_is_not_run_again(tmp_path: Path, script: Path) -> None:
    slurm_with_queue(tmp_path, "queue 4242\nexec sleep 30\n")
    job = calls.sbatch_once(["sbatch", "--parsable", str(script)], NAME, tries=3, env=on_path(tmp_path), **FAST)
    assert job == "4242"
    assert called(tmp_path, "sbatch") == [f"--parsable {script}"]
    assert called(tmp_path, "squeue") == [f"-h -t all --name={NAME} --user={os.getuid()} -o %i"]


def test_sbatch_whose_answer_was_lost_is_not_run_again(tmp_path: Path, script: Path) -> None:
    slurm_with_queue(tmp_path, 'queue 77\necho "sbatch: error: Batch job submission failed: Socket timed out on '
                               'send/recv operation" >&2; exit 1\n')
    assert calls.sbatch_once(["sbatch", "--parsable", str(script)], NAME, env=on_path(tmp_path), **FAST) == "77"
    assert len(called(tmp_path, "sbatch")) == 1


def test_sbatch_that_timed_out_before_queueing_is_run_again(tmp_path: Path, script: Path) -> None:
    slurm_with_queue(tmp_path, 'if [ "$n" -eq 1 ]; then exec sleep 30; fi\nqueue 4243\necho "4243;cluster"\n')
    assert calls.sbatch_once(["sbatch", "--parsable", str(script)], NAME, env=on_path(tmp_path), **FAST) == "4243"
    assert len(called(tmp_path, "sbatch")) == 2 and len(called(tmp_path, "squeue")) == 1
    assert (tmp_path / "queue").read_text() == f"4243 {NAME}\n"


def test_sbatch_that_never_answers_gives_up_after_the_tries(tmp_path: Path, script: Path) -> None:
    slurm_with_queue(tmp_path, "exec sleep 30\n")
    with pytest.raises(calls.NoAnswer, match=f"no answer in 0.5 s \\(3 tries; squeue shows no job named {NAME}\\)"):
        calls.sbatch_once(["sbatch", "--parsable", str(script)], NAME, tries=3, env=on_path(tmp_path), **FAST)
    assert len(called(tmp_path, "sbatch")) == 3 and len(called(tmp_path, "squeue")) == 3


def test_sbatch_refused_is_not_run_again(tmp_path: Path, script: Path) -> None:
    slurm_with_queue(tmp_path, 'echo "sbatch: error: Batch job submission failed: Invalid partition name '
                               'specified" >&2; exit 1\n')
    with pytest.raises(BatonError, match="sbatch refused it: .*Invalid partition name specified") as raised:
        calls.sbatch_once(["sbatch", "--parsable", str(script)], NAME, env=on_path(tmp_path), **FAST)
    assert not isinstance(raised.value, calls.NoAnswer)
    assert len(called(tmp_path, "sbatch")) == 1 and called(tmp_path, "squeue") == []


def test_job_names_are_one_submissions_and_hold_no_comma() -> None:
    from launcher.resolve import Resolved
    from launcher.slurm.driver import job_name

    r = Resolved(0, "pre,train", "mlm", 1, 1, (), {"run_name": "r,1"}, "", {})
    assert job_name(r, "a1b2c3") == "baton.r_1.pre_train.a1b2c3"


# ----------------------------------------------------------------- the callers


@pytest.fixture
def slurm_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on PATH for the code under test, with short timeouts and pauses."""
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BATON_SLURM_TIMEOUT_S", "0.5")
    monkeypatch.setattr(calls, "BACKOFF_S", 0.01)
    monkeypatch.setattr(calls, "TRIES", 2)
    return tmp_path


def test_job_states_rides_out_a_busy_controller(slurm_bin: Path) -> None:
    fake(slurm_bin, "squeue", failing(1, TIMED_OUT, "42|PENDING|Dependency"))
    assert jobs.job_states(["42"]) == {"42": ("PENDING", "Dependency")}


def test_status_says_when_slurm_does_not_answer(slurm_bin: Path) -> None:
    fake(slurm_bin, "squeue", "exec sleep 30\n")
    states = jobs.slurm_states({"mlm": {"slurm": {"job_id": "42"}}})
    assert states["mlm"]["state"] == "unknown" and "no answer in 0.5 s" in states["mlm"]["reason"]


def test_a_requeue_without_an_answer_is_not_taken_for_done(slurm_bin: Path) -> None:
    fake(slurm_bin, "scontrol", "exec sleep 30\n")
    assert "no answer" in (jobs.requeue("42") or "")
    assert called(slurm_bin, "scontrol") == ["requeue 42"] * 2


def test_cancel_after_a_transient_failure(slurm_bin: Path) -> None:
    fake(slurm_bin, "scancel", failing(1, "Unable to contact slurm controller (connect failure)", ""))
    assert jobs.cancel(["42", "43"]) == {}
    assert called(slurm_bin, "scancel") == ["42 43"] * 2


def test_the_allocation_script_requeues_through_a_busy_controller(tmp_path: Path) -> None:
    """launcher/slurm/allocation.sbatch: baton exits 75 (stopped after a checkpoint), the first requeue times out
    (transiently), the second is taken."""
    fake(tmp_path, "baton", "exit 75\n")
    fake(tmp_path, "scontrol", failing(1, "Socket timed out on send/recv operation", ""))
    env = on_path(tmp_path) | {"SLURM_JOB_ID": "77", "BATON": str(tmp_path / "baton"), "BATON_SLURM_TIMEOUT_S": "5"}
    proc = subprocess.run(["bash", str(ROOT / "launcher" / "slurm" / "allocation.sbatch"), "m.yaml", "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75, proc.stderr
    assert called(tmp_path, "baton") == ["run m.yaml --dry-run"]
    assert called(tmp_path, "scontrol") == ["requeue 77"] * 2
