"""Structured pruning of transformers models: score attention heads, FFN neurons and whole layers, keep the
best, and build a genuinely smaller model of the same class whose config states the new sizes, so that
`from_pretrained` loads it with no custom code.

A model family says where its units live, as parameter names inside one transformer layer and the axis of
each that a unit spans:

- an FFN neuron j is row j of the FFN's input projections and column j of its output projection;
- an attention head is its head_dim rows of q/k/v and its columns of the output projection. Heads are cut in
  whole key-value groups (a kv head and the query heads that share it), so grouped-query attention keeps its
  ratio. Only configs that state head_dim (Llama, Qwen2, Mistral) can shrink their heads: BERT and GPT-2 derive
  the head size from the hidden size, so a model with fewer heads would have other heads, not fewer;
- a layer is one entry of the layer list.

Sizes are global in a transformers config, so every layer keeps the same number of neurons and heads (each
layer its own best). Importance, per unit (larger is more important):

- magnitude: the L2 norm of the unit's weights;
- gradient: Σ over calibration batches of Σ |w · ∂L/∂w| over the unit's weights (first-order Taylor);
- activation: the mean over calibration tokens of |a| (FFN neuron) or ‖head output‖₂ (head), Minitron's.

Layers are ranked by block importance, the mean over calibration tokens of 1 − cos(layer input, layer output)
(ShortGPT, Minitron): a layer that barely turns the hidden state goes first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from stages.runtime.spec import SpecError


@dataclass(frozen=True)
class Family:
    """Where a family's units live. Names are relative to one layer; each rule is (name, axis)."""

    name: str
    layers: str  # the layer list below the base model
    ffn: tuple[tuple[str, int], ...]  # every tensor an FFN neuron spans, with its axis
    ffn_out: str  # the FFN output projection (its input holds the neuron activations)
    attn_out: str  # the attention output projection (its input holds the heads' outputs)
    q: tuple[tuple[str, int], ...] = ()  # query-head tensors (head_dim rows per head)
    kv: tuple[tuple[str, int], ...] = ()  # key/value-head tensors
    keys: dict[str, str] = field(default_factory=dict)  # config key of: ffn, layers (and heads, kv_heads)

    @property
    def heads(self) -> bool:
        return bool(self.q)


ENCODER = Family(
    "encoder", "encoder.layer",
    ffn=(("intermediate.dense.weight", 0), ("intermediate.dense.bias", 0), ("output.dense.weight", 1)),
    ffn_out="output.dense", attn_out="attention.output.dense",
    keys={"ffn": "intermediate_size", "layers": "num_hidden_layers"},
)
LLAMA = Family(
    "llama", "layers",
    ffn=(("mlp.gate_proj.weight", 0), ("mlp.gate_proj.bias", 0), ("mlp.up_proj.weight", 0), ("mlp.up_proj.bias", 0),
         ("mlp.down_proj.weight", 1)),
    ffn_out="mlp.down_proj", attn_out="self_attn.o_proj",
    q=(("self_attn.q_proj.weight", 0), ("self_attn.q_proj.bias", 0), ("self_attn.o_proj.weight", 1)),
    kv=(("self_attn.k_proj.weight", 0), ("self_attn.k_proj.bias", 0), ("self_attn.v_proj.weight", 0),
        ("self_attn.v_proj.bias", 0)),
    keys={"ffn": "intermediate_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
          "kv_heads": "num_key_value_heads"},
)
GPT2 = Family(  # Conv1D keeps its weight as [in, out]
    "gpt2", "h", ffn=(("mlp.c_fc.weight", 1), ("mlp.c_fc.bias", 0), ("mlp.c_proj.weight", 0)),
    ffn_out="mlp.c_proj", attn_out="attn.c_proj", keys={"ffn": "n_inner", "layers": "n_layer"},
)
FAMILIES = {"bert": ENCODER, "roberta": ENCODER, "xlm-roberta": ENCODER, "electra": ENCODER, "llama": LLAMA,
            "qwen2": LLAMA, "mistral": LLAMA, "gpt2": GPT2}


def family_of(model, key: str = "prune") -> Family:
    """The model's family; exit 2 naming `key` (the manifest setting that needs it) for another model."""
    f = FAMILIES.get(model.config.model_type)
    if f is None:
        raise SpecError(f"{key}: model_type {model.config.model_type!r} is not supported (supported: "
                        f"{', '.join(sorted(FAMILIES))})")
    return f


@dataclass(frozen=True)
class Shape:
    """A model's prunable sizes."""

    layers: int
    ffn: int
    heads: int  # query heads per layer (0: the family cannot cut heads)
    kv_heads: int
    head_dim: int


def shape_of(model, f: Family) -> Shape:
    c = model.config
    ffn = getattr(c, f.keys["ffn"], None) or 4 * c.hidden_size  # GPT-2: n_inner null means 4 × n_embd
    if not f.heads:
        return Shape(len(layer_list(model, f)), ffn, 0, 0, 0)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return Shape(len(layer_list(model, f)), ffn, heads, kv, getattr(c, "head_dim", None) or c.hidden_size // heads)


def _layer_holder(model, f: Family) -> tuple[Any, str]:
    """(the module holding the layer list, the list's attribute name)."""
    *path, name = f.layers.split(".")
    holder: Any = model.base_model
    for part in path:
        holder = getattr(holder, part)
    return holder, name


def layer_list(model, f: Family) -> nn.ModuleList:
    holder, name = _layer_holder(model, f)
    return getattr(holder, name)


def keep_layers(model, keep: Literal["every_other"] | list[int], key: str) -> list[int]:
    """Keep only the transformer layers `keep` (every_other: 0, 2, 4 …) of `model`, in place (a ZeRO-3-partitioned
    model too), and set its config's layer count; the kept layers are the same modules, their weights untouched.
    Returns the kept indices; exit 2 naming `key` for indices the model lacks or a model this cannot cut."""
    f = family_of(model, key)
    holder, name = _layer_holder(model, f)
    layers = getattr(holder, name)
    n = len(layers)
    indices: list[int] = list(range(0, n, 2)) if keep == "every_other" else list(keep)
    if indices[-1] >= n:
        raise SpecError(f"{key}: {indices}: the model has {n} layers (0 … {n - 1})")
    _check_movable(model, indices, key)
    kept = nn.ModuleList([layers[i] for i in indices])
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new)  # noqa: B010  # the key/value cache's slot
    setattr(holder, name, kept)
    setattr(model.config, f.keys["layers"], len(indices))
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in indices]
    return indices


def _check_movable(model, indices: list[int], key: str) -> None:
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and indices != list(range(len(indices))):
        raise SpecError(f"{key}: the model scales attention by its layer index (scale_attn_by_inverse_layer_idx), so "
                        "a layer moved to another index would compute otherwise")


# ----------------------------------------------------------------- importance


class Scores:
    """Per layer: FFN neuron scores [ffn], kv-group scores [kv_heads], and the block importance sums."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.ffn = torch.zeros(shape.layers, shape.ffn, dtype=torch.float64)
        self.groups = torch.zeros(shape.layers, max(shape.kv_heads, 1), dtype=torch.float64)
        self.blocks = torch.zeros(shape.layers, dtype=torch.float64)  # Σ over tokens of 1 − cos
        self.tokens = torch.zeros(1, dtype=torch.float64)

    def tensors(self) -> list[torch.Tensor]:
        return [self.ffn, self.groups, self.blocks, self.tokens]


def _per_unit(t: torch.Tensor, axis: int, units: int) -> torch.Tensor:
    """Σ of `t` over everything but `axis`, then over the consecutive slices of `axis` that make a unit."""
    moved = t.double().movedim(axis, 0)
    return moved.reshape(units, -1).sum(1)


def _layer_tensors(model, f: Family, i: int) -> dict[str, nn.Parameter]:
    return dict(layer_list(model, f)[i].named_parameters())


def _weights_score(model, f: Family, s: Scores, value: Callable[[nn.Parameter], torch.Tensor | None]) -> None:
    """Add Σ value(w) per unit to `s` (magnitude: w²; gradient: |w · grad|)."""
    shape = s.shape
    for i in range(shape.layers):
        params = _layer_tensors(model, f, i)
        for name, axis in f.ffn:
            if name in params and (v := value(params[name])) is not None:
                s.ffn[i] += _per_unit(v, axis, shape.ffn)
        for name, axis in f.q:
            if name in params and (v := value(params[name])) is not None:
                s.groups[i] += _per_unit(v, axis, shape.kv_heads)  # a group's query heads are consecutive
        for name, axis in f.kv:
            if name in params and (v := value(params[name])) is not None:
                s.groups[i] += _per_unit(v, axis, shape.kv_heads)


def magnitude(model, f: Family) -> Scores:
    s = Scores(shape_of(model, f))
    with torch.no_grad():
        _weights_score(model, f, s, lambda p: p.detach() ** 2)
    s.ffn.sqrt_()
    s.groups.sqrt_()
    return s


class Calibration:
    """Scores gathered over calibration batches: `with Calibration(model, f, how) as c:` then, per batch,
    `c.batch(attention_mask, loss_fn)`, where loss_fn runs the forward pass (output_hidden_states=True) and
    returns (loss, hidden_states)."""

    def __init__(self, model, f: Family, how: str) -> None:
        self.model, self.f, self.how = model, f, how
        self.scores = Scores(shape_of(model, f))
        self._mask: torch.Tensor | None = None
        self._hooks: list[Any] = []

    def __enter__(self) -> Calibration:
        if self.how == "activation":
            for i, layer in enumerate(layer_list(self.model, self.f)):
                modules = dict(layer.named_modules())
                self._hooks.append(modules[self.f.ffn_out].register_forward_pre_hook(self._ffn_hook(i)))
                if self.f.heads:
                    self._hooks.append(modules[self.f.attn_out].register_forward_pre_hook(self._heads_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, features] of the real (unpadded) tokens."""
        flat = x.detach().double().reshape(-1, x.shape[-1])
        return flat if self._mask is None else flat[self._mask.reshape(-1).bool()]

    def _ffn_hook(self, i: int):
        def hook(module, args):
            self.scores.ffn[i] += self._tokens(args[0]).abs().sum(0).cpu()
        return hook

    def _heads_hook(self, i: int):
        shape = self.scores.shape

        def hook(module, args):
            per_head = self._tokens(args[0]).reshape(-1, shape.heads, shape.head_dim).norm(dim=-1)  # [tokens, heads]
            self.scores.groups[i] += per_head.sum(0).reshape(shape.kv_heads, -1).sum(1).cpu()
        return hook

    def batch(self, attention_mask: torch.Tensor,
              run: Callable[[], tuple[torch.Tensor, Iterable[torch.Tensor]]]) -> None:
        self._mask = attention_mask
        if self.how == "gradient":
            self.model.zero_grad(set_to_none=True)
            loss, hidden = run()
            loss.backward()
            _weights_score(self.model, self.f, self.scores,
                           lambda p: None if p.grad is None else (p.detach() * p.grad).abs())
        else:
            with torch.no_grad():
                loss, hidden = run()
        states = [h.detach().double() for h in hidden]
        real = attention_mask.reshape(-1).bool()
        for i in range(self.scores.shape.layers):
            a = states[i].reshape(-1, states[i].shape[-1])[real]
            b = states[i + 1].reshape(-1, states[i + 1].shape[-1])[real]
            self.scores.blocks[i] += (1 - nn.functional.cosine_similarity(a, b, dim=-1)).sum().cpu()
        self.scores.tokens += float(real.sum())


# ----------------------------------------------------------------- the cut


@dataclass(frozen=True)
class Plan:
    """What a pruned model keeps: the layers (original indices), and per kept layer the FFN neurons and the
    kv groups (original indices, ascending)."""

    layers: list[int]
    ffn: list[list[int]]
    groups: list[list[int]]

    def as_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "ffn": self.ffn, "kv_groups": self.groups}


def keep_count(total: int, fraction: float) -> int:
    return max(1, min(total, math.floor(fraction * total + 0.5)))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """The k best indices (ties: the lower index), ascending."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def plan(s: Scores, *, ffn: float | None, heads: float | None, layers: int | None) -> Plan:
    shape = s.shape
    kept_layers = list(range(shape.layers))
    if layers is not None and layers < shape.layers:
        kept_layers = _top(s.blocks, layers)
    n_ffn = shape.ffn if ffn is None else keep_count(shape.ffn, ffn)
    n_groups = shape.kv_heads if heads is None else keep_count(shape.kv_heads, heads)
    return Plan(kept_layers, [_top(s.ffn[i], n_ffn) for i in kept_layers],
                [_top(s.groups[i], n_groups) for i in kept_layers] if shape.heads else [[] for _ in kept_layers])


def _rows(units: list[int], unit: int) -> list[int]:
    return [u * unit + r for u in units for r in range(unit)]


def pruned_config(model, f: Family, p: Plan):
    """The model's config with the kept sizes."""
    import copy

    c = copy.deepcopy(model.config)
    shape = shape_of(model, f)
    setattr(c, f.keys["layers"], len(p.layers))
    setattr(c, f.keys["ffn"], len(p.ffn[0]) if p.ffn else shape.ffn)
    if f.heads:
        per_group = shape.heads // shape.kv_heads
        groups = len(p.groups[0]) if p.groups else shape.kv_heads
        c.head_dim = shape.head_dim  # stated: it is no longer hidden_size / heads
        setattr(c, f.keys["heads"], groups * per_group)
        setattr(c, f.keys["kv_heads"], groups)
    if isinstance(getattr(c, "layer_types", None), list):
        c.layer_types = [c.layer_types[i] for i in p.layers]
    return c


def apply(model, f: Family, p: Plan):
    """A new model of the same class, with the pruned config and the kept weights (eval mode, CPU)."""
    _check_movable(model, p.layers, "prune.layers")
    shape = shape_of(model, f)
    config = pruned_config(model, f, p)
    new = type(model)(config)
    prefix = ("" if model is model.base_model else model.base_model_prefix + ".") + f.layers + "."
    state = model.state_dict()
    out = {}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    per_group = shape.heads // shape.kv_heads if f.heads else 0
    for key in new.state_dict():
        m = pattern.fullmatch(key)
        if m is None:
            out[key] = state[key].clone()
            continue
        j, name = int(m[1]), m[2]
        t = state[f"{prefix}{p.layers[j]}.{name}"]
        for rule, axis in f.ffn:
            if rule == name:
                t = t.index_select(axis, torch.tensor(p.ffn[j]))
        for rule, axis in f.q:
            if rule == name:
                heads = [g * per_group + h for g in p.groups[j] for h in range(per_group)]
                t = t.index_select(axis, torch.tensor(_rows(heads, shape.head_dim)))
        for rule, axis in f.kv:
            if rule == name:
                t = t.index_select(axis, torch.tensor(_rows(p.groups[j], shape.head_dim)))
        out[key] = t.clone()
    new.load_state_dict(out, strict=True)
    return new.eval()
