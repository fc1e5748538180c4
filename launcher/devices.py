"""`launcher.nproc_per_node: auto`: one process per GPU of the node a stage runs on, read without torch (the
driver never imports it). Resolved where the stage's processes are started: by `baton run` on its own machine
(also inside a Slurm allocation, where Slurm sets CUDA_VISIBLE_DEVICES to the node's GPUs), and for `baton submit`
and its jobs from `slurm.gpus_per_node`, the GPUs each job's node is given: the login node that submits has none,
and the job must plan with the count `submit` planned with, or its fingerprint would differ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the NVIDIA driver has found


def visible_gpus(environ: Mapping[str, str] = os.environ, listed: Path = NVIDIA_GPUS) -> int:
    """The GPUs a process started here would see: CUDA_VISIBLE_DEVICES where it is set (counted as CUDA counts it,
    up to the first entry that is empty or -1), else those the NVIDIA driver lists; 0 without any."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for entry in visible.split(","):
            if not entry.strip() or entry.strip().startswith("-"):
                break
            count += 1
        return count
    try:
        return sum(1 for p in listed.iterdir() if p.is_dir())
    except OSError:
        return 0


def processes_per_node(asked: int | str, gpus_per_node: int | None, under_slurm: bool) -> int:
    """`asked` itself, or for "auto": under Slurm `gpus_per_node` (ValueError without it); elsewhere the visible
    GPUs, else 1 process: on a CPU-only machine auto is `nproc_per_node: 1`, so such a run and its fingerprints
    equal one with an explicit 1 (two CPU ranks would only split the cores, and change the global batch)."""
    if asked != "auto":
        return int(asked)
    if under_slurm:
        if not gpus_per_node:
            raise ValueError("auto under `baton submit` is the GPUs each job's node is given: set slurm.gpus_per_node "
                             "(the submitting machine's GPUs are not the nodes'), or give a number")
        return gpus_per_node
    return visible_gpus() or 1
