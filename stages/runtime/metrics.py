"""The training loop's rate window (its train records and rank 0's progress line), and language-model metrics."""

from __future__ import annotations

import math
import os
import time

import torch

from stages.runtime import dist, records
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


class Metrics:
    """The training loop's rates over the steps since the previous train record, for its train records
    (`records.log`) and rank 0's progress line."""

    def __init__(self, max_steps: int, *, flops: Flops | None = None, peak_flops: float | None = None) -> None:
        """`flops`: the model's FLOPs estimate, and `peak_flops` the accelerator's (per rank): with both, the
        train records carry the model FLOPs utilisation (mfu)."""
        self.max_steps = max_steps
        self.flops, self.peak_flops = flops, peak_flops
        self._window: tuple[float, int] | None = None

    def start(self, step: int, world_size: int, resharded_from: int | None = None) -> None:
        """`resharded_from`: the world size of the checkpoint resumed, when it was another."""
        records.start(world_size, step=step, max_steps=self.max_steps, resharded_from=resharded_from)
        self._window = (time.perf_counter(), step)

    def first_step(self, step: int) -> None:
        startup = time.time() - process_start_time()
        records.log("first_step", startup_s=round(startup, 3))
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
        records.log("train", step=step, samples=samples, loss=loss, lr=lr, tokens=round(tokens),
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
