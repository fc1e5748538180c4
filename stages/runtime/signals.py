"""Stop requests (SIGTERM, SIGUSR1 from Slurm before a time limit, SIGINT) that all ranks agree on.

A handler only sets a flag; the loop all-reduces it once per optimizer step, so
every rank stops after the same step, even when the signal reached only some of them.
"""

from __future__ import annotations

import signal

_received: int | None = None


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, _handler)


def _handler(signum: int, frame: object) -> None:
    global _received
    _received = signum


def received() -> bool:
    """Whether this rank got a stop signal (the loop agrees on it across ranks, see loop.fit)."""
    return _received is not None
