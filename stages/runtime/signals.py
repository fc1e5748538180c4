"""Stop requests (SIGTERM, SIGUSR1 from Slurm before a time limit, SIGINT) that all ranks agree on.

A handler only sets a flag; the loop all-reduces it once per optimizer step, so
every rank stops after the same step, even when the signal reached only some of them.
A long call that never returns to the loop (SentencePiece's trainer, in C++) runs
under `unless_stopped`, which gives up on it when a stop request comes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL_S = 0.2  # how often `unless_stopped` looks at the flag

_received: int | None = None


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, _handler)


def _handler(signum: int, frame: object) -> None:
    global _received
    _received = signum


def received() -> bool:
    """Whether this rank got a stop request (the loop agrees on it across ranks, see loop.fit)."""
    return _received is not None


class Stopped(Exception):
    """A stop request came while `unless_stopped` waited: the call was left unfinished."""


def unless_stopped(call: Callable[[], T]) -> T:
    """`call()`, run in a worker thread while this (the main) thread waits for it or for a stop request.

    Python runs signal handlers in the main thread only, between bytecodes: during a long call into C++
    (SentencePiece's trainer, which releases the GIL) the flag would be set only once the call returned.
    Waiting here keeps the main thread in Python, so a request is seen within POLL_S and `Stopped` raised
    at once; the worker is left behind, and the caller must end the process soon after (os._exit ends it
    with its thread). An exception of `call` is raised here.
    """
    if received():
        raise Stopped
    out: dict[str, T] = {}
    failed: list[BaseException] = []

    def work() -> None:
        try:
            out["value"] = call()
        except BaseException as e:  # handed to the main thread
            failed.append(e)

    worker = threading.Thread(target=work, name="unless_stopped", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL_S)
        if received():
            raise Stopped
    if failed:
        raise failed[0]
    return out["value"]
