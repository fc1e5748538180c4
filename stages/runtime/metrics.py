"""metrics.jsonl records and the rank-0 progress line."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from contract.files import json_safe
from stages.runtime import dist, trackers
from stages.runtime.speed import Flops


def process_start_time() -> float:
    """Unix time this process started (from /proc), so start-up includes interpreter and imports."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORT_TIME


_IMPORT_TIME = time.time()


def environment() -> dict[str, Any]:
    """What rank 0 runs on, for the ledger's record of the attempt: host, torch build, CUDA, NCCL, GPU."""
    import torch

    env: dict[str, Any] = {"host": socket.gethostname(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env |= {"nccl": ".".join(map(str, torch.cuda.nccl.version())), "gpu": torch.cuda.get_device_name(),
                "gpus_per_node": torch.cuda.device_count()}
    return env


class Metrics:
    """Appends one JSON object per line to `<stage_dir>/metrics.jsonl` on rank 0; other ranks write nothing."""

    def __init__(self, stage_dir: str, max_steps: int, *, flops: Flops | None = None,
                 peak_flops: float | None = None) -> None:
        """`flops`: the model's FLOPs estimate, and `peak_flops` the accelerator's (per rank): with both, the
        train records carry the model FLOPs utilisation (mfu)."""
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.max_steps = max_steps
        self.flops, self.peak_flops = flops, peak_flops
        self._window: tuple[float, int] | None = None

    def log(self, event: str, **fields: Any) -> None:
        """Rank 0: append the record, and hand it to the stage's trackers (TensorBoard, W&B, MLflow)."""
        if not dist.is_main():
            return
        record = json_safe({"event": event, "time": time.time(), **fields})  # a NaN loss is recorded as null
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        trackers.record(record)

    def start(self, step: int, world_size: int, resharded_from: int | None = None) -> None:
        """`resharded_from`: the world size of the checkpoint resumed, when it was another."""
        extra = {} if resharded_from is None else {"resharded_from": resharded_from}
        self.log("start", step=step, max_steps=self.max_steps, world_size=world_size, **extra,
                 environment=environment())
        self._window = (time.perf_counter(), step)

    def first_step(self, step: int) -> None:
        startup = time.time() - process_start_time()
        self.log("first_step", startup_s=round(startup, 3))
        dist.print0(f"first step after {startup:.1f} s")
        # The rate then measures steady state, not the first step's warm-up.
        self._window = (time.perf_counter(), step)

    def train(self, step: int, samples: int, loss: float, lr: float, tokens: float, rows: float) -> None:
        """`tokens`, `rows`: what every rank's training passes processed since the last train record."""
        t0, s0 = self._window or (time.perf_counter(), step)
        now = time.perf_counter()
        seconds = now - t0 if now > t0 and step > s0 else 0.0
        rate = (step - s0) / seconds if seconds else 0.0
        token_rate = tokens / seconds if seconds else 0.0
        self._window = (now, step)
        extra: dict[str, float] = {}
        if self.flops is not None and self.peak_flops and rows:
            achieved = token_rate * self.flops.per_token(tokens / rows)
            extra["mfu"] = round(achieved / (self.peak_flops * dist.world_size()), 4)
        self.log("train", step=step, samples=samples, loss=loss, lr=lr, tokens=round(tokens),
                 steps_per_s=round(rate, 3), tokens_per_s=round(token_rate, 1), **extra)
        eta = (self.max_steps - step) / rate if rate else float("nan")
        mfu = f"  mfu {extra['mfu']:.1%}" if extra else ""
        dist.print0(f"step {step}/{self.max_steps}  loss {loss:.4f}  lr {lr:.3e}  {rate:.2f} steps/s  "
                    f"{token_rate:,.0f} tokens/s{mfu}  eta {eta:.0f} s")


def language_model_metrics(total: torch.Tensor) -> dict[str, float]:
    """Collective. eval_loss (mean per predicted token) and perplexity from this rank's [loss sum, tokens]."""
    dist.all_reduce_sum(total)
    loss = float(total[0] / total[1]) if total[1] else float("nan")
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 80.0))}
