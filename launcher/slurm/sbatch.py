"""The sbatch script of one stage: a pure function of typed settings, pinned by golden files.

Flags are sorted and every value is quoted: `#SBATCH` lines in sbatch's own quoting
(double quotes, backslash escapes; sbatch parses them, no shell does), the command in
the body with shlex. A job always asks for --requeue, --open-mode=append (a requeued
job appends to its log) and a USR1 warning before its time limit, so the stage can
checkpoint and requeue itself. Dependencies are not in the script but on the sbatch
command line, so a person can `sbatch` the kept script again by hand.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

# manifest field -> sbatch flag
FLAGS = {
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "time": "time",
    "mem": "mem",
    "cpus_per_task": "cpus-per-task",
    "gpus_per_node": "gpus-per-node",
}
# flags baton owns: the stage contract depends on them
RESERVED = {"job-name", "nodes", "ntasks-per-node", "output", "error", "open-mode", "requeue", "no-requeue", "signal",
            "kill-on-invalid-dep", "dependency", "wrap"}
FLAG_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
SAFE = re.compile(r"^[A-Za-z0-9_./:@=+,-]+$")


def sbatch_quote(value: str) -> str:
    """Quote a value for a `#SBATCH` line the way sbatch parses it."""
    if SAFE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_extra(extra: dict[str, Any]) -> dict[str, str]:
    """{flag: problem} for user-given extra flags (names only; values are quoted whatever they hold).

    `baton validate` and every plan call this, so a bad flag is refused before anything is submitted.
    """
    problems = {}
    for flag in extra:
        if not FLAG_NAME.match(flag):
            problems[flag] = f"{flag!r} is not an sbatch long option name (lowercase letters, digits, dashes)"
        elif flag in RESERVED:
            problems[flag] = f"{flag!r} is set by baton and cannot be overridden"
    return problems


def render(*, job_name: str, nodes: int, output: str, settings: dict[str, Any], command: list[str],
           preamble: str = "") -> str:
    """The job script. `output` is the log path (a Slurm filename pattern: %j is the job id)."""
    problems = check_extra(settings.get("extra") or {})
    if problems:
        raise ValueError("; ".join(problems.values()))
    flags: dict[str, str | None] = {
        "job-name": job_name,
        "nodes": str(nodes),
        "ntasks-per-node": "1",  # one torchrun per node; it starts the node's ranks
        "output": output,
        "open-mode": "append",
        "requeue": None,
        "signal": f"B:USR1@{settings['signal_before_s']}",
        "kill-on-invalid-dep": "yes",
    }
    for key, flag in FLAGS.items():
        if settings.get(key) is not None:
            flags[flag] = str(settings[key])
    for flag, value in (settings.get("extra") or {}).items():
        flags[flag] = None if value is None else str(value)
    lines = ["#!/bin/bash", "# Rendered by baton for one stage; `sbatch` this file to run the stage again."]
    lines += [f"#SBATCH --{f}" if v is None else f"#SBATCH --{f}={sbatch_quote(v)}" for f, v in sorted(flags.items())]
    lines.append("")
    if preamble.strip():
        lines += ["# --- site preamble", preamble.rstrip("\n"), "# ---"]
    # exec: baton itself receives the USR1 warning (B: sends it to the batch shell) and forwards it
    lines.append("exec " + shlex.join(command))
    return "\n".join(lines) + "\n"
