"""Layer groups of a transformers model, and what the layer-wise options make of them: which groups train
in each phase of gradual unfreezing, and the learning rate of each (layer-wise decay).

The groups, bottom to top: `embeddings` (the base model's parameters before its layers), `layer0` …
`layer{L-1}` (the base model's list of `config.num_hidden_layers` blocks), `head` (everything else: the
pooler or final norm, the classifier or LM head, a stage's training-only heads). Tied weights count once,
where first met (BERT's and GPT-2's LM decoder are the word embeddings). Found from the module structure
alone, so BERT-, RoBERTa-, GPT-2-, Llama-like models split alike; another shape is refused with exit 2.

Gradual unfreezing: phase p trains the top `start + p` groups, p = min(step // every_steps, G - start).
DeepSpeed fixes the trainable set at `deepspeed.initialize` (a later requires_grad change is ignored under
ZeRO, DeepSpeed issue #5639), so each phase has an engine of its own (`lifecycle.Training.renew`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from contract.sections import Unfreeze
from stages.runtime import dist, engine
from stages.runtime.spec import SpecError


@dataclass(frozen=True)
class Group:
    name: str
    params: list[nn.Parameter]

    def numel(self) -> int:
        # a ZeRO-3 partitioned parameter is empty locally; ds_numel is its real size
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.params)


def groups(net: nn.Module, model: nn.Module) -> list[Group]:
    """The layer groups of `net` (what the engine trains: `model`, the transformers model, or a module
    around it), bottom to top. SpecError (exit 2) for a model whose layers cannot be found."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    base = getattr(model, "base_model", model)
    blocks = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not isinstance(count, int) or len(blocks) != 1:
        raise SpecError(f"layer-wise options (layerwise, train.layer_lr_decay): cannot split {type(model).__name__} "
                        f"into layers: {len(blocks) or 'no'} lists of config.num_hidden_layers={count} modules in its "
                        "base model, where one is needed; BERT- and GPT-like transformers models can be split")
    layer_of = {id(p): i for i, block in enumerate(blocks[0]) for p in block.parameters()}
    in_base = {id(p) for p in base.parameters()}
    embeddings: list[nn.Parameter] = []
    layers: list[list[nn.Parameter]] = [[] for _ in range(count)]
    head: list[nn.Parameter] = []
    for p in net.parameters():  # registration order: the base model's embeddings come before its layers
        if id(p) in layer_of:
            layers[layer_of[id(p)]].append(p)
        elif id(p) in in_base and not any(layers):
            embeddings.append(p)
        else:
            head.append(p)
    named = [Group("embeddings", embeddings)] + [Group(f"layer{i}", ps) for i, ps in enumerate(layers)]
    return [g for g in [*named, Group("head", head)] if g.params]


@dataclass(frozen=True)
class Unfreezing:
    """Gradual unfreezing over `num_groups` layer groups: a pure function of the step."""

    unfreeze: Unfreeze
    num_groups: int

    def phase(self, step: int) -> int:
        """The phase of the engine at `step` (steps done): 0 … num_groups - start."""
        return min(step // self.unfreeze.every_steps, max(0, self.num_groups - self.unfreeze.start))

    def trainable(self, step: int) -> int:
        """How many groups, from the top, train at `step`."""
        return min(self.num_groups, self.unfreeze.start + self.phase(step))

    def starts_phase(self, step: int) -> bool:
        return step > 0 and self.phase(step) != self.phase(step - 1)


def optimizer_groups(found: list[Group], *, step: int, unfreezing: Unfreezing | None, lr: float, decay: float,
                     weight_decay: float) -> list[dict]:
    """Freeze the groups that do not train at `step` and return the optimizer's parameter groups: each training
    layer group's decay/no-decay split (`engine.param_groups`) at lr × decay^(G-1-g), or with decay 1 the two
    groups of every trainable parameter, as without layer-wise options. Logs one line per layer group."""
    top = unfreezing.trainable(step) if unfreezing else len(found)
    out: list[dict] = []
    lines = []
    for g, group in enumerate(found):
        trains = g >= len(found) - top
        for p in group.params:
            p.requires_grad_(trains)
        scale = decay ** (len(found) - 1 - g)
        if trains and decay != 1:
            out += engine.param_groups(group.params, weight_decay, lr=lr * scale)
        lines.append(f"  {group.name:<12} lr ×{scale:.4f}  {group.numel():>11,} params"
                     + ("" if trains else "  frozen"))
    if decay == 1:
        out = engine.param_groups([p for group in found for p in group.params if p.requires_grad], weight_decay)
    if unfreezing is not None:
        dist.print0(f"unfreezing phase {unfreezing.phase(step)} from step {step}: the top {top} of "
                    f"{len(found)} layer groups train")
    dist.print0("layer groups:\n" + "\n".join(lines))
    return out


def copy_weights(src: nn.Module, dst: nn.Module, zero3: bool) -> None:
    """Collective under ZeRO-3. Every parameter and buffer of `src` into `dst` (the same architecture),
    exactly; under ZeRO-3 one parameter at a time is gathered, so the model is never whole twice."""
    import deepspeed

    if not zero3:
        dst.load_state_dict(src.state_dict())
        return
    theirs = dict(src.named_parameters())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            with deepspeed.zero.GatheredParameters([theirs[name]]), \
                    deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(theirs[name].data)
        buffers = dict(src.named_buffers())
        for name, b in dst.named_buffers():
            b.copy_(buffers[name])
