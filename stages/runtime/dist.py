"""The one place for distributed state: init, rank queries, rank-0 output, and how a stage ends."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from contract.imports import DEEPSPEED_UNUSED, hidden


@dataclass(frozen=True, slots=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


_state: Dist | None = None
T = TypeVar("T")


def init() -> Dist:
    """Start the process group (nccl on GPUs, gloo on CPU) from torchrun's environment."""
    global _state
    cuda = torch.cuda.is_available()
    if not cuda:
        # Must precede `import deepspeed`: it picks its accelerator at import time.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with hidden(*DEEPSPEED_UNUSED):  # contract/imports.py: a second and more of each rank's start-up
        import deepspeed

    # On CPU, init_distributed would JIT-compile a shared-memory comm op (40–70 s);
    # gloo alone gives identical results.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    _state = Dist(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
    )
    return _state


def precision_refused(precision: str, device: torch.device, supports_bf16: Callable[[], bool] | None = None,
                      name: Callable[[], str] | None = None) -> str | None:
    """Why this rank's device cannot train at `precision`, or None. bf16 needs a GPU of compute capability 8.0 or
    more (A100, L4, H100 …): on an older one (V100, T4) torch would emulate it or fail deep in a kernel. The CPU
    trains bf16 (slowly). `supports_bf16`, `name`: the device's answers (torch.cuda's by default)."""
    if precision != "bf16" or device.type != "cuda":
        return None
    if (supports_bf16 or (lambda: torch.cuda.is_bf16_supported(including_emulation=False)))():
        return None
    gpu = (name or torch.cuda.get_device_name)()
    return (f"precision: bf16, but this node's GPU ({gpu}) has no bf16 support (it needs compute capability 8.0 or "
            "more: A100, L4, H100 …); set precision: fp16 (mixed precision with loss scaling) or fp32")


def rank() -> int:
    # Before init (e.g. a bad spec), torchrun's RANK is all there is.
    return _state.rank if _state else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return _state.world_size if _state else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if _state is not None and _state.world_size > 1:
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place, and returned; a no-op on one rank. Takes CPU tensors on any back-end (nccl reduces on the GPU)."""
    if _state is not None and _state.world_size > 1:
        buf = t.to(_state.device)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
    return t


def any_rank(flag: bool) -> bool:
    """Collective. Whether `flag` is true on some rank (e.g. a stop request that reached only some)."""
    return bool(all_reduce_sum(torch.tensor([int(flag)])).item())


def device() -> torch.device:
    """This rank's device (the CPU before init)."""
    return _state.device if _state is not None else torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch (built on the CPU) on this rank's device."""
    return {k: v.to(device(), non_blocking=True) for k, v in batch.items()}


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (collective)."""
    if _state is None or _state.world_size == 1:
        return [obj]
    out: list[Any] = [None] * _state.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def finish(code: int, *, sync: bool = True) -> None:
    """End the process with `code`, skipping interpreter finalisation.

    ZeRO-3 on gloo intermittently aborts at exit (a pending all-gather work
    object destroyed during finalisation, SIGABRT), which would turn a finished
    stage into a failure; `os._exit` after a barrier ends it honestly. `sync`
    is false on error paths, where the other ranks may never reach a barrier.
    """
    if sync:
        barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
