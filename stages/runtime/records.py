"""metrics.jsonl: the stage's one records sink, configured once by the entry point, as `logging` is.

`configure(stage_dir, *handlers)` when the stage starts (entry.run, every rank); then `log(event, **fields)` from
anywhere: rank 0 appends `{"event", "time", **fields}` as one line of `<stage_dir>/metrics.jsonl` and hands the
record to the handlers (the trackers: TensorBoard, W&B, MLflow); the other ranks write nothing. `close(code)` once
as the stage ends, on every path (entry.run). docs/stage-contract.md lists the records.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from contract.files import json_safe
from stages.runtime import dist

METRICS = "metrics.jsonl"


class Handler(Protocol):
    """Where rank 0's records go besides the file (trackers.Trackers)."""

    def record(self, record: dict[str, Any]) -> None: ...

    def close(self, code: int) -> None: ...


_path: Path | None = None
_handlers: list[Handler] = []


def configure(stage_dir: str, *handlers: Handler) -> None:
    """At the stage's start, on every rank, before the first record: where records go."""
    global _path, _handlers
    _path, _handlers = Path(stage_dir) / METRICS, list(handlers)


def log(event: str, **fields: Any) -> None:
    """Rank 0: append the record to metrics.jsonl, then hand it to the handlers. Other ranks: nothing."""
    if not dist.is_main():
        return
    assert _path is not None, "records.configure comes first (entry.run calls it)"
    record = json_safe({"event": event, "time": time.time(), **fields})  # a NaN loss is recorded as null
    with open(_path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    for handler in _handlers:
        handler.record(record)


def start(world_size: int, *, step: int = 0, max_steps: int = 0, resharded_from: int | None = None) -> None:
    """Every stage's `start` record, once its inputs are checked (the launcher reads it so): the step it starts
    from and the steps it trains to (0 for a stage that trains nothing), and what rank 0 runs on.
    `resharded_from`: the world size of the checkpoint resumed, when it was another."""
    extra = {} if resharded_from is None else {"resharded_from": resharded_from}
    log("start", step=step, max_steps=max_steps, world_size=world_size, **extra, environment=environment())


def close(code: int) -> None:
    """Once, as the stage ends with `code` (0 done, 75 stopped to resume, other: failed): the handlers close."""
    for handler in _handlers:
        handler.close(code)


def environment() -> dict[str, Any]:
    """What rank 0 runs on, for the ledger's record of the attempt: host, torch build, CUDA, NCCL, GPU."""
    import torch

    env: dict[str, Any] = {"host": socket.gethostname(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env |= {"nccl": ".".join(map(str, torch.cuda.nccl.version())), "gpu": torch.cuda.get_device_name(),
                "gpus_per_node": torch.cuda.device_count()}
    return env
