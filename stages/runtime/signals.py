"""Stop requests (SIGTERM, SIGUSR1 from Slurm before a time limit, SIGINT) that all ranks agree on.

A handler only sets a flag; the loop asks `stop_requested()` once per optimizer
step, which all-reduces the flag so every rank stops after the same step, even
when the signal reached only some of them.
"""

from __future__ import annotations

import signal

import torch

from stages.runtime import dist

_received: int | None = None


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, _handler)


def _handler(signum: int, frame: object) -> None:
    global _received
    _received = signum


def stop_requested() -> bool:
    """Collective: call on every rank at the same point."""
    flag = torch.tensor([1 if _received is not None else 0], dtype=torch.int32)
    return bool(dist.all_reduce_sum(flag).item())
