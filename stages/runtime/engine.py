"""The DeepSpeed engine: config, ZeRO-3 model construction, optimizer groups and the LR schedule."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from contract.sections import Train
from stages.runtime.spec import TrainingSpec

# transformers finds the DeepSpeed config through a weakref; this keeps its target alive.
_zero3_config: _Zero3Config | None = None


class _Zero3Config:
    """What transformers asks of `HfDeepSpeedConfig` (`is_zero3()`, `.config`).

    The real class needs `accelerate`, which baton does not depend on.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return True


def zero_stage(spec: TrainingSpec) -> int:
    return int(spec.deepspeed.get("zero_optimization", {}).get("stage", 0))


def prepare_model_construction(spec: TrainingSpec) -> None:
    """Call before building the model. Under ZeRO-3, transformers then builds it partitioned.

    `deepspeed.zero.Init()` around the constructor crashes in transformers 5;
    letting `from_pretrained` / `from_config` see the config works.
    """
    global _zero3_config
    if zero_stage(spec) == 3:
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        _zero3_config = _Zero3Config(ds_config(spec))
        set_hf_deepspeed_config(_zero3_config)


def ds_config(spec: TrainingSpec) -> dict[str, Any]:
    cfg = copy.deepcopy(spec.deepspeed)
    if not torch.cuda.is_available():
        # DeepSpeed's own Adam kernels JIT-compile C++ for over a minute on CPU.
        cfg.setdefault("optimizer", {}).setdefault("params", {}).setdefault("torch_adam", True)
    return cfg


def initialize(model: torch.nn.Module, spec: TrainingSpec, max_steps: int, load_universal: bool = False, *,
               groups: list[dict[str, Any]] | None = None, step: int = 0):
    """deepspeed.initialize with decay/no-decay groups and our schedule, so checkpoints hold its state.
    `load_universal`: the checkpoint to load is a universal one (saved at another world size).
    `groups`: the optimizer's parameter groups (default: `param_groups` of every trainable parameter; the
    layer-wise options give one pair per layer group, each with its own lr). `step`: where the schedule
    starts, for an engine made mid-run (gradual unfreezing); the schedule multiplies each group's own lr."""
    import deepspeed

    train = spec.train
    config = ds_config(spec)
    if load_universal:
        config.setdefault("checkpoint", {})["load_universal"] = True

    def schedule(optimizer):
        for group in optimizer.param_groups:  # LambdaLR asks for it when it starts past step 0
            group.setdefault("initial_lr", group["lr"])
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, max_steps), last_epoch=step - 1)

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model.parameters(), train.weight_decay) if groups is None else groups,
        config=config,
        lr_scheduler=schedule,
        dist_init_required=False,
    )
    engine.global_steps = step  # as a resumed engine's count, so checkpoints agree
    return engine


def param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float, lr: float | None = None,
                 ) -> list[dict[str, Any]]:
    """The trainable ones of `params` as a decay and a no-decay group (empty ones left out), at `lr` when given
    (else the optimizer's)."""
    # Biases and norm weights are 1-D; decaying them only hurts (BERT, GPT-2 and HF Trainer all exempt them).
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in params:
        if p.requires_grad:
            (decay if _ndim(p) >= 2 else no_decay).append(p)
    rate = {} if lr is None else {"lr": lr}
    return [{"params": ps, "weight_decay": wd, **rate} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]


def _ndim(p: torch.nn.Parameter) -> int:
    # A ZeRO-3 partitioned parameter is empty locally; ds_shape is its real shape.
    return len(getattr(p, "ds_shape", p.shape))


def lr_lambda(train: Train, max_steps: int) -> Callable[[int], float]:
    """Multiplier of train.lr at optimizer step `s`: linear warm-up, then constant / linear / cosine to 0."""
    warmup = train.warmup_steps

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if train.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, max_steps - warmup))
        if train.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def max_steps(train: Train, num_samples: int) -> int:
    if train.max_steps is not None:
        return train.max_steps
    assert train.epochs is not None and train.global_batch_size is not None, "the contract sets these"
    return math.ceil(train.epochs * num_samples / train.global_batch_size)


def current_lr(engine) -> float:
    """The highest group's rate: train.lr as the schedule has it (with layer_lr_decay: the head's)."""
    return max(float(lr) for lr in engine.get_lr())
