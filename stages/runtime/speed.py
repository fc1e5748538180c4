"""What a training step processed and what that cost in compute: tokens, and model FLOPs utilisation on a GPU.

Tokens are the non-padding tokens of every training forward pass (its attention mask's ones, or every input id
without a mask), counted on the device so that counting never waits on it. FLOPs per token follow the usual
estimate (PaLM's appendix B, as torchtitan and nanoGPT use it): 6 × the non-embedding parameters (forward and
backward of every matrix) + 12 × layers × hidden × sequence length (attention's scores and weighted sum).
MFU divides the achieved FLOP/s by the accelerators' dense bf16/fp16 peak, for the GPUs in PEAK_TFLOPS.

`RateWindow` is the training loop's: the rates and mfu of its `train` records, the start-up time of its
`first_step` record, and rank 0's progress line. Each train record also carries the writing rank's peak memory so
far (`peak_memory_mb`): on a GPU the tensors' peak (torch.cuda.max_memory_allocated, what a smaller batch or a
ZeRO stage changes), on the CPU the process's peak resident set (every allocation the process made, the
libraries' included).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch
from torch import nn

from stages.runtime import dist, records

# Dense bf16/fp16 tensor-core peak per GPU, TFLOP/s (vendor data sheets, without sparsity). The first key found
# in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = {
    "GH200": 989.0, "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "A6000": 155.0,
}


class TokenCounter:
    """Counts the tokens and rows of `module`'s forward passes in training mode (eval passes are not training)."""

    def __init__(self, module: nn.Module) -> None:
        self.tokens: torch.Tensor | float = 0.0
        self.rows: torch.Tensor | float = 0.0
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self.attach(module)

    def attach(self, module: nn.Module) -> None:
        """Count `module`'s passes from now on (a new engine's, after gradual unfreezing renews it)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None:
            self.tokens = self.tokens + mask.sum(dtype=torch.float64)
            self.rows = self.rows + mask.shape[0]
        elif isinstance(ids, torch.Tensor):
            self.tokens = self.tokens + float(ids.numel())
            self.rows = self.rows + (ids.shape[0] if ids.dim() > 1 else 1)

    def take(self, device: torch.device) -> torch.Tensor:
        """[tokens, rows] since the last take, as a float64 tensor on `device` (for one all-reduce with the loss)."""
        out = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in (self.tokens, self.rows)])
        self.tokens = self.rows = 0.0
        return out


@dataclass(frozen=True, slots=True)
class Flops:
    dense_params: int  # parameters outside embedding tables
    layers: int
    hidden: int

    def per_token(self, seq_len: float) -> float:
        """Training FLOPs per token of a sequence of `seq_len` tokens (forward + backward)."""
        return 6.0 * self.dense_params + 12.0 * self.layers * self.hidden * seq_len


def flops_of(model: nn.Module) -> Flops | None:
    """The FLOPs estimate of a transformers model (None without the config fields it needs)."""
    config = getattr(model, "config", None)
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first(config, "hidden_size", "n_embd", "d_model", "dim")
    if layers is None or hidden is None:
        return None
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    dense = sum(_numel(p) for p in {id(p): p for p in model.parameters()}.values() if id(p) not in embedding)
    return Flops(dense_params=dense, layers=int(layers), hidden=int(hidden))


def peak_flops(precision: str) -> float | None:
    """The dense peak FLOP/s of this process's GPU at `precision` (bf16, fp16), or None (the CPU, fp32, a GPU not
    in PEAK_TFLOPS)."""
    if precision == "fp32" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


class RateWindow:
    """The training loop's rates: steps/s, tokens/s and (with `flops` and `peak_flops`) the model FLOPs utilisation
    over the steps since the previous train record, for its `train` records and rank 0's progress line."""

    def __init__(self, max_steps: int, *, flops: Flops | None = None, peak_flops: float | None = None) -> None:
        """`flops`: the model's FLOPs estimate, and `peak_flops` the accelerator's (per rank): with both, the
        train records carry the model FLOPs utilisation (mfu)."""
        self.max_steps = max_steps
        self.flops, self.peak_flops = flops, peak_flops
        self._window: tuple[float, int] | None = None

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
        # A log on the first step after a (re)start measured no time: no rates, rather than a 0 that reads as a stall
        extra: dict[str, float] = {"steps_per_s": round(rate, 3), "tokens_per_s": round(token_rate, 1)} \
            if seconds else {}
        if seconds and self.flops is not None and self.peak_flops and rows:
            achieved = token_rate * self.flops.per_token(tokens / rows)
            extra["mfu"] = round(achieved / (self.peak_flops * dist.world_size()), 4)
        records.log("train", step=step, samples=samples, loss=loss, lr=lr, tokens=round(tokens), **extra,
                    peak_memory_mb=round(peak_memory_mb(), 1))
        eta = (self.max_steps - step) / rate if rate else float("nan")
        mfu = f"  mfu {extra['mfu']:.1%}" if "mfu" in extra else ""
        dist.print0(f"step {step}/{self.max_steps}  loss {loss:.4f}  lr {lr:.3e}  {rate:.2f} steps/s  "
                    f"{token_rate:,.0f} tokens/s{mfu}  eta {eta:.0f} s")


def peak_memory_mb() -> float:
    """This process's peak memory so far, MiB: its GPU's allocated tensors, else its resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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


def _first(config, *names: str) -> int | None:
    return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partitioned parameter is empty locally
