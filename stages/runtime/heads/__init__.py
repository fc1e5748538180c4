"""Heads: what a model predicts, one module per objective (classify, mlm, clm, sft), each answering the same few
questions. Kinds (stages/<kind>.py) say what a stage does; they ask a head and never branch on the objective, so a
new head is usable by every kind that takes `task:` at once.

A head is made by `load(name, source)`: it reads and tokenizes its data section (cached under the run's cache_dir)
and then answers:

- `auto()`: the AutoModelFor… class its model is (contract.heads names it; `auto(name)` before a head is made);
  `model_args()`: what `models.build_model` adds to the config
  (a classifier's labels, a causal LM's end-of-document token when built from a config);
- `classes`: a classifier's label names in id order (None: the logits range over a vocabulary);
- `splits`: its examples per split ("train", "eval"; None where the section has none); `describe()`: one line;
- `batch(split, keys, max_length)`: a collated batch on the device of (index, epoch) keys. Every batch carries
  `labels`: the target of each prediction, -100 where nothing is predicted; a key with index -1 is a padding row
  (`data.eval_shards`), run for ZeRO-3's sake and counting for nothing (its labels are all -100). A head over rows
  without labels (`Source.labelled` False, a distill transfer set) gives the same rows with no target: a
  classifier's labels are then UNLABELLED (the row counts, its target is unknown), a language model's are its
  text as ever;
- `module(model)`: the module an engine wraps: `module(**batch)` gives the rows of logits that count, (rows,
  classes), in the order of `targets(batch)` (for mlm only the masked positions are projected onto the vocabulary);
- `select(logits, batch)`: the same rows of a model's full logits (a teacher's); `targets(batch)`: their labels;
  `examples(batch)`: the batch row each of them belongs to;
- `loss(rows, batch)`: the training loss, the mean over the rows that count;
- `sums(rows, batch)`: what a batch adds to its split's metrics (float64), and `metrics_of(total)`, collective,
  the metrics from every rank's total (a program that runs its own eval loop, distill's, scores with these);
- `evaluate(net, split, batch_size, d, predictions)`: collective, the split's metrics (`metrics`, the names) on
  `net`, a `module(model)` (or an engine around one); {} without the split; with `predictions`, rank 0 writes each
  eval example's prediction to that file (JSON lines, in eval order) where the head has any;
- `example_losses(net, indices)`: each training example's mean loss (a curriculum's scoring, eval.score_train).

The metric names and the shared eval sets a head is scored on are the contract's (contract.heads).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from contract.heads import HEADS
from contract.spec import DataSpec
from stages.runtime import data
from stages.runtime.dist import Dist
from stages.runtime.spec import Spec, SpecError

Keys = list[tuple[int, int]]  # (example index, epoch) per row; index -1: a padding row
UNLABELLED = -1  # a classifier's label of a row that counts but has no known target (a transfer row)


@dataclass(frozen=True)
class Source:
    """What a head reads: a data section, the tokenizer, and the head's settings.

    `key` names the section in errors (data, sections.<task>, evals.<set>). `options`: the head's own settings as the
    kind gives them (mlm: mask_prob; clm: block_size; sft: its section). `labels`: a classifier's label names in id
    order when a model already fixes them (its config's id2label), else None (data.labels, or the train split's).
    `eval_only`: only the eval split is read (a shared eval set); `train`: whether the section's train split is read
    (False: a stage that only scores its data, as the head reads it, an ensemble's); `seed`: what masking and the
    like derive from. `labelled` False: the rows have no labels (a distill transfer set), only their inputs are
    read; a classifier then takes its class names from `labels`."""

    data: DataSpec
    tokenizer: Any
    tokenizer_digest: str
    cache_dir: str
    seed: int
    key: str = "data"
    options: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    eval_only: bool = False
    train: bool = True
    difficulty: tuple[str, ...] = ()  # columns kept beside the tokens (a curriculum's difficulty column)
    labelled: bool = True
    prepared: str | None = None  # a prepare stage's final/ to read the splits from (data.from), instead of `data`


class Head(Protocol):
    name: str
    metrics: tuple[str, ...]
    source: Source
    splits: dict[str, Any]
    classes: list[str | int] | None  # the names of the classes its logits range over, where they have names

    def auto(self) -> Any: ...

    def model_args(self, from_config: bool) -> dict[str, Any]: ...

    def describe(self) -> str: ...

    def batch(self, split: str, keys: Keys, max_length: int | None = None) -> dict[str, torch.Tensor]: ...

    def module(self, model: nn.Module) -> nn.Module: ...

    def select(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def examples(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def loss(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def sums(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def metrics_of(self, total: torch.Tensor) -> dict[str, float]: ...

    def evaluate(self, net: Any, split: str, batch_size: int, d: Dist, predictions: str | None = None
                 ) -> dict[str, float]: ...

    def example_losses(self, net: Any, indices: list[int]) -> torch.Tensor: ...


def of(spec: Spec, name: str, tokenizer: Any, labels: list[str] | None = None, **options: Any) -> Head:
    """The head `name` over the stage's own data section (spec.data), with the head's `options`; `labels`: as
    `Source.labels` (a trained classifier's own)."""
    c = spec.curriculum
    difficulty = (c.difficulty.column,) if c and c.difficulty and c.difficulty.column else ()
    return load(name, Source(data=spec.data, tokenizer=tokenizer, tokenizer_digest=data.tokenizer_digest(spec),
                             cache_dir=spec.cache_dir, seed=spec.seed, options=options, labels=labels,
                             difficulty=difficulty,
                             prepared=spec.ref("data").path if "data" in spec.inputs else None))


def unlabelled(spec: Spec, section: str, name: str, tokenizer: Any, labels: list[str | int] | None,
               **options: Any) -> Head:
    """The head `name` over the rows of spec.sections[section] read without labels (a distill transfer set),
    masked from a seed of its own; `labels`: the class names the logits are in the order of (a classifier's)."""
    if section not in spec.sections:
        raise SpecError(f"sections.{section}: missing from the spec")
    return load(name, Source(data=spec.sections[section], tokenizer=tokenizer,
                             tokenizer_digest=data.tokenizer_digest(spec), cache_dir=spec.cache_dir,
                             seed=data.seed_of(spec.seed, section), key=f"sections.{section}", options=options,
                             labels=None if labels is None else [str(n) for n in labels], labelled=False))


def auto(name: str) -> Any:
    """The AutoModelFor… class of head `name`'s models."""
    import transformers

    return getattr(transformers, HEADS[name].model)


def model_labels(name: str, model: Any) -> list[str] | None:
    """A trained model's own class names in id order, where head `name`'s classes have names (a classifier)."""
    if HEADS[name].classes != "num_labels":
        return None
    config = model.config
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def load(name: str, source: Source) -> Head:
    """The head `name` (a module of this package) over `source`'s data."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise ValueError(f"no head {name!r}") from None
    return module.load(source)
