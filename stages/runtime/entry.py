"""How a stage process starts and ends: `python -m stages.<kind> --spec spec.json` → exit code."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from contract.layout import EXIT_BAD_INPUT, EXIT_FAILED, write_bad_input
from contract.spec import ContractError
from stages.runtime import dist, records, signals, trackers
from stages.runtime import spec as spec_mod
from stages.runtime.checkpoint import NoSpace, intact, no_space
from stages.runtime.dist import Dist
from stages.runtime.spec import Spec, SpecError, TrainingSpec

S = TypeVar("S", bound=Spec)


def run(main: Callable[[Spec, Dist], int]) -> None:
    """Parse --spec, start distributed state, call `main`, and exit with the contract's code. Never returns."""
    _run(main, lambda spec: spec)


def run_training(main: Callable[[TrainingSpec, Dist], int]) -> None:
    """`run` for a training kind: `main` gets a TrainingSpec, its training sections checked here, once (exit 2
    where one is null). Never returns."""
    _run(main, TrainingSpec.of)


def _run(main: Callable[[S, Dist], int], narrow: Callable[[Spec], S]) -> None:
    signals.install()
    keep_freed_memory()
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="path to the stage's spec.json")
    args = parser.parse_args()
    try:
        spec = narrow(spec_mod.load(args.spec))
        records.configure(spec.stage_dir, trackers.Trackers(spec))
        d = dist.init()
        if d.world_size != spec.world_size:
            raise SpecError(f"{args.spec}: world_size {spec.world_size} but torchrun started {d.world_size} processes")
        if why := dist.precision_refused(spec.precision, d.device):
            raise SpecError(why)
        code = main(spec, d)
    except BaseException as e:
        code = failure(e, args.spec)
        with contextlib.suppress(Exception):  # a tracker that cannot write now (a full disk) changes nothing
            records.close(code)
        dist.finish(code, sync=False)
    records.close(code)  # dist.finish skips interpreter finalisation: nothing would flush the trackers after it
    dist.finish(code)


def failure(e: BaseException, spec_path: str) -> int:
    """What a stage that raised `e` reports, and its exit code: a bad spec or input (said once, by rank 0) and a
    full disk (by whichever rank met it: the others may be waiting for it) are one line on stderr and error.json,
    exit 2; anything else is its traceback, exit 1."""
    stage_dir = json.loads(Path(spec_path).read_text()).get("stage_dir") if Path(spec_path).is_file() else None
    full = stage_dir is not None and no_space(e, stage_dir)
    if full or isinstance(e, (ContractError, ValidationError)):  # ValidationError: spec.options vs the kind's model
        if full and not isinstance(e, NoSpace):
            e = NoSpace(f"no space left on device: {e}; {intact(stage_dir) if stage_dir else ''}")
        if full or dist.is_main():
            print(f"baton stage error: {e}", file=sys.stderr, flush=True)
            # torchrun reports any failing rank as its own exit 1; this file tells the launcher why
            if stage_dir and Path(stage_dir).is_dir():
                try:
                    write_bad_input(stage_dir, " ".join(str(e).split()), getattr(e, "changed", None), full)
                except OSError:  # the disk is still full; the launcher reads the exit and the log
                    pass
        return EXIT_BAD_INPUT
    traceback.print_exc()
    return EXIT_FAILED


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP = 1 << 30  # bytes


def keep_freed_memory() -> None:
    """On the CPU, glibc gives every block above its mmap threshold (at most 32 MiB) back to the system when it is
    freed, and trims the heap's top: a training step that allocates and frees its gradient buckets and activations
    maps fresh pages every step (page faults, kernel time). Blocks up to 1 GiB come from the heap and up to 1 GiB of
    free memory stays there instead, at the price of a larger resident set. Left alone on a GPU (the big buffers
    live on the device), off glibc, and when the environment sets glibc's own MALLOC_*_ variables."""
    import torch

    if torch.cuda.is_available() or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(M_MMAP_THRESHOLD, KEEP)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP)
