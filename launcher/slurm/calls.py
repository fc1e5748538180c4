"""Every call baton makes to Slurm's client commands: each with a timeout, tried again (a bounded number of times)
while the controller is out of reach.

A busy slurmctld, or one failing over to its backup, makes squeue, scontrol, sacct and scancel hang, or fail with
words that mean "not now" (a socket timed out, the controller could not be contacted). A stage's job deciding
whether to requeue itself, `baton submit` and `baton cancel` must neither hang on that nor take it for Slurm's
answer: `run` waits at most a timeout per call and tries again after a pause that doubles each time, `tries` calls
in all. Any other failure is Slurm's answer (a job it does not know, a request it refuses): `run` raises it at
once, or hands it back to a caller that reads it (`check=False`).

sbatch is not idempotent: a call that timed out, or whose answer was lost, may have queued the job all the same.
`sbatch_once` asks squeue before each retry for this user's job of the name the script gives it (one submission of
one stage has it) and takes that job instead of queueing a second.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

from launcher.errors import BatonError

TIMEOUT_S = 30.0  # per call; $BATON_SLURM_TIMEOUT_S sets another
TRIES = 4  # calls in all: the first and three more
BACKOFF_S = 2.0  # the pause before the second call, doubled before each next one
# Slurm's words for a controller (or accounting database) that is busy or out of reach. Not "slurm_load_jobs
# error" as such: it also heads the permanent "Invalid job id specified".
TRANSIENT = re.compile(
    r"Socket timed out|Unable to contact slurm controller|Communication connection failure|"
    r"Zero Bytes were transmitted or received|backup controller in standby mode|try again later|"
    r"Resource temporarily unavailable|Connection refused|Connection reset|Connection timed out",
    re.IGNORECASE,
)


class NoAnswer(BatonError):
    """A Slurm command timed out, or found the controller out of reach, on every try."""


def run(argv: list[str], *, check: bool = True, timeout_s: float | None = None, tries: int | None = None,
        backoff_s: float | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command (squeue, scontrol, sacct, scancel) until it answers; its result.

    A failure that is Slurm's answer raises a BatonError naming the command and what it said, or with
    `check=False` is returned for the caller to read. Raises NoAnswer when every one of `tries` calls timed out
    or was transient. Left out, `timeout_s` is `default_timeout()`, `tries` TRIES and `backoff_s` BACKOFF_S;
    `env`: the command's environment (its PATH finds the command).
    """
    timeout, tries, backoff_s = _settings(timeout_s, tries, backoff_s)
    why = ""
    for k in range(tries):
        if k:
            _pause(argv[0], why, backoff_s * 2 ** (k - 1), f"trying again ({k + 1} of {tries})")
        out, why = _call(argv, timeout, env)
        if out is not None:
            if check and out.returncode != 0:
                raise BatonError(f"{shlex.join(argv)}: {_said(out)}")
            return out
    raise NoAnswer(f"{shlex.join(argv)}: {why} ({tries} tries)")


def sbatch_once(argv: list[str], job_name: str, *, timeout_s: float | None = None, tries: int | None = None,
                backoff_s: float | None = None, env: dict[str, str] | None = None) -> str:
    """Submit with `argv` (sbatch --parsable … script) the script whose job is named `job_name`; the job's id.

    After a call that timed out or was transient, squeue is asked for this user's job of that name: when Slurm has
    one, that is the job and sbatch is not called again. `job_name` must be this submission's alone, and have no
    comma (squeue reads --name as a list). Raises a BatonError with what sbatch said when it refuses the job,
    NoAnswer when no call got an answer and Slurm holds no such job.
    """
    assert "," not in job_name, job_name
    timeout, tries, backoff_s = _settings(timeout_s, tries, backoff_s)
    why = ""
    for k in range(tries):
        out, why = _call(argv, timeout, env)
        if out is not None:
            if out.returncode != 0:
                raise BatonError(f"sbatch refused it: {_said(out)}")
            return out.stdout.strip().split(";")[0]
        # the pause first: a submission the controller was still taking in when sbatch gave up shows by then
        _pause("sbatch", why, backoff_s * 2**k, "asking squeue whether the job was queued all the same")
        try:
            found = run(["squeue", "-h", "-t", "all", f"--name={job_name}", f"--user={os.getuid()}", "-o", "%i"],
                        timeout_s=timeout, tries=tries, backoff_s=backoff_s, env=env).stdout.split()
        except BatonError as e:
            raise NoAnswer(f"sbatch: {why}; whether it queued job {job_name} is unknown: {e}") from None
        if found:
            return found[0]
    raise NoAnswer(f"{shlex.join(argv)}: {why} ({tries} tries; squeue shows no job named {job_name})")


def default_timeout() -> float:
    """TIMEOUT_S, or $BATON_SLURM_TIMEOUT_S (for a controller that is slow to answer)."""
    value = os.environ.get("BATON_SLURM_TIMEOUT_S")
    if not value:
        return TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise BatonError(f"BATON_SLURM_TIMEOUT_S={value!r}: give the seconds a Slurm command may take, above 0")
    return seconds


def _settings(timeout_s: float | None, tries: int | None, backoff_s: float | None) -> tuple[float, int, float]:
    return (default_timeout() if timeout_s is None else timeout_s, TRIES if tries is None else tries,
            BACKOFF_S if backoff_s is None else backoff_s)


def _call(argv: list[str], timeout: float,
          env: dict[str, str] | None) -> tuple[subprocess.CompletedProcess[str] | None, str]:
    """One call: (its result, "") when Slurm answered, else (None, why not)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"no answer in {timeout:g} s"
    except FileNotFoundError:
        raise BatonError(f"{argv[0]} not found: Slurm's client commands must be on PATH") from None
    if out.returncode != 0 and TRANSIENT.search(out.stderr):
        return None, _said(out)
    return out, ""


def _said(out: subprocess.CompletedProcess[str]) -> str:
    return out.stderr.strip() or f"exited {out.returncode}"


def _pause(command: str, why: str, seconds: float, then: str) -> None:
    print(f"baton: {command}: {why}; {then} in {seconds:g} s", file=sys.stderr, flush=True)
    time.sleep(seconds)
