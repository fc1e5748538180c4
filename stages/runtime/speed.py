"""What a training step processed and what that cost in compute: tokens, and model FLOPs utilisation on a GPU.

Tokens are the non-padding tokens of every training forward pass (its attention mask's ones, or every input id
without a mask), counted on the device so that counting never waits on it. FLOPs per token follow the usual
estimate (PaLM's appendix B, as torchtitan and nanoGPT use it): 6 × the non-embedding parameters (forward and
backward of every matrix) + 12 × layers × hidden × sequence length (attention's scores and weighted sum).
MFU divides the achieved FLOP/s by the accelerators' dense bf16/fp16 peak, for the GPUs in PEAK_TFLOPS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


def _first(config, *names: str) -> int | None:
    return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partitioned parameter is empty locally
