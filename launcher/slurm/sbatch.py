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

from contract.sections import SBATCH_OWN, sbatch_extra_problems

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
SAFE = re.compile(r"^[A-Za-z0-9_./:@=+,-]+$")


def sbatch_quote(value: str) -> str:
    """Quote a value for a `#SBATCH` line the way sbatch parses it."""
    if SAFE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(*, job_name: str, nodes: int, output: str, settings: dict[str, Any], command: list[str],
           preamble: str = "") -> str:
    """The job script. `output` is the log path (a Slurm filename pattern: %j is the job id)."""
    # the manifest's Slurm model refuses these at load (`baton validate`); checked again for any other caller
    problems = sbatch_extra_problems(settings.get("extra") or {})
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
    assert flags.keys() <= SBATCH_OWN, "slurm.extra must not be able to override a flag baton sets"
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
