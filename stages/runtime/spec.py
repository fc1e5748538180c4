"""spec.json (version 1, see docs/stage-contract.md) as frozen dataclasses.

Loading checks every key against the contract, so a launcher/stage mismatch
fails at start-up with the key path instead of deep inside training.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal


class SpecError(Exception):
    """Bad spec or input: the stage prints the message as one line and exits 2."""


_frozen = dataclass(frozen=True, kw_only=True, slots=True)


@_frozen
class Init:
    source: Literal["stage", "pretrained", "config"]
    stage: str | None
    path: str | None
    digest: str | None
    config: dict[str, Any] | None


@_frozen
class TokenizerRef:
    source: Literal["stage", "pretrained"]
    stage: str | None
    path: str
    digest: str | None


@_frozen
class Hub:
    name: str
    config: str | None
    train_split: str
    eval_split: str | None


@_frozen
class Data:
    train_files: list[str]
    eval_files: list[str]
    format: Literal["json", "csv", "parquet", "text"] | None  # None with hub
    hub: Hub | None
    text_field: str
    text_pair_field: str | None
    label_field: str | None
    labels: list[str | int] | None
    max_length: int
    digests: dict[str, str]


@_frozen
class Train:
    max_steps: int | None
    epochs: float | None
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    lr: float
    schedule: Literal["constant", "linear", "cosine"]
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float | None
    betas: list[float]
    eps: float
    log_every: int


@_frozen
class Checkpoint:
    every_steps: int | None
    keep_last: int


@_frozen
class Eval:
    every_steps: int | None
    at_end: bool


@_frozen
class Spec:
    spec_version: Literal[1]
    run_name: str
    stage: str
    kind: Literal["tokenizer", "mlm", "classify"]
    stage_dir: str
    cache_dir: str
    fingerprint: str
    seed: int
    precision: Literal["fp32", "bf16", "fp16"]
    world_size: int
    init: Init | None
    tokenizer: TokenizerRef | None
    data: Data
    train: Train | None  # these four are None for kind tokenizer
    checkpoint: Checkpoint | None
    eval: Eval | None
    options: dict[str, Any]
    deepspeed: dict[str, Any] | None

    def option(self, name: str) -> Any:
        if name not in self.options:
            raise SpecError(f"spec options.{name}: missing (required for kind {self.kind})")
        return self.options[name]


def load(path: str) -> Spec:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: cannot read spec: {e}") from None
    spec = _build(Spec, raw, path, "")
    if spec.kind == "tokenizer":
        return spec
    for key in ("init", "tokenizer", "train", "checkpoint", "eval", "deepspeed"):
        if getattr(spec, key) is None:
            raise SpecError(f"{path}: {key}: null, but kind {spec.kind} needs it")
    t = spec.train
    if (t.max_steps is None) == (t.epochs is None):
        raise SpecError(f"{path}: train: exactly one of max_steps / epochs must be set")
    if t.micro_batch_size * t.grad_accum * spec.world_size != t.global_batch_size:
        raise SpecError(f"{path}: train.global_batch_size {t.global_batch_size} != micro_batch_size × grad_accum × world_size")
    return spec


def _build(cls: type, raw: Any, file: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: {where or 'spec'}: expected an object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise SpecError(f"{file}: {where or 'spec'}: unknown key(s) {', '.join(unknown)}")
    values = {}
    for name in names:
        key = f"{where}.{name}" if where else name
        if name not in raw:
            raise SpecError(f"{file}: {key}: missing")
        values[name] = _value(hints[name], raw[name], file, key)
    return cls(**values)


def _value(tp: Any, value: Any, file: str, key: str) -> Any:
    """Check `value` against the annotation shallowly: enough to catch a wrong contract version."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        errors = []
        for option in inner:
            try:
                return _value(option, value, file, key)
            except SpecError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, file, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise SpecError(f"{file}: {key}: {value!r} is not one of {choices}")
        return value
    base = origin or tp
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is Any or (isinstance(value, base) and not (isinstance(value, bool) and base is int)):
        return value
    raise SpecError(f"{file}: {key}: expected {getattr(base, '__name__', base)}, got {type(value).__name__} {value!r}")
