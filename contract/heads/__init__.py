"""The registry of heads, the contract's half: every module in this package is one objective (what a model predicts)
and says what the launcher must know of it without torch: its metrics, which shared eval sets score it, the model
class it is. The stage's half, which trains and evaluates it, is stages/runtime/heads/<head>.py.

A head module defines `HEAD`, a `HeadInfo` named as the module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import JsonValue


@dataclass(frozen=True)
class HeadInfo:
    name: str
    metrics: tuple[str, ...]  # what its eval reports (a gate or a variants' selection may name them)
    fits: Literal["classify", "text"]  # the shared eval sets (manifest `evals:`, their task) it is scored on
    model: str  # the transformers class of its model, for messages
    classes: Literal["num_labels", "vocab_size"]  # what its logits range over (a teacher must have as many)
    # its settings in a kind's section that takes `task:` (distill, teacher_logits), with their defaults; where
    # block_size is one, examples are packed into blocks (rows made alike need the same block_size, else max_length)
    options: dict[str, Any] = field(default_factory=dict)
    storable: bool = True  # whether its rows are the same every epoch, so a teacher's logits of them can be stored
    # whether it reads rows of plain text without labels (a distill transfer set: the teacher's logits are their
    # only targets); sft's rows are a completion's tokens, which text alone does not have
    unlabelled: bool = True
    # the model of its own section, for settings beyond `options` (sft's columns, template, label set): a kind that
    # takes `task:` reads it from its `head:` field (distill.head)
    settings: Any = None


def _discover() -> dict[str, HeadInfo]:
    found: dict[str, HeadInfo] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        head = importlib.import_module(f"{__name__}.{info.name}").HEAD
        assert head.name == info.name, f"contract/heads/{info.name}.py declares head {head.name!r}"
        found[head.name] = head
    return found


HEADS: dict[str, HeadInfo] = _discover()
# What a shared eval set of each task reports, whichever head it scores
SET_METRICS: dict[str, tuple[str, ...]] = {"classify": HEADS["classify"].metrics, "text": ("eval_loss", "perplexity")}


def option_problems(task: str, given: dict[str, Any]) -> list[tuple[str, str]]:
    """(option, why) for each option in `given` (those not None) that head `task` does not take."""
    out = []
    for name, value in given.items():
        if value is not None and name not in HEADS[task].options:
            takes = [h for h, info in HEADS.items() if name in info.options]
            out.append((name, f"{name} is for task {' or '.join(takes)} (task is {task})"))
    return out


def settings(task: str, given: dict[str, Any]) -> dict[str, Any]:
    """Head `task`'s options: those in `given` (not None), its defaults for the rest."""
    return {name: default if given.get(name) is None else given[name]
            for name, default in HEADS[task].options.items()}


def names(*, storable: bool = False) -> list[JsonValue]:
    """The heads' names (those whose rows can be stored), for a JSON Schema enum."""
    return [name for name, info in HEADS.items() if info.storable or not storable]


def check(name: str) -> str:
    """`name` if it is a head; a ValueError naming the heads otherwise (pydantic turns it into the key's error)."""
    if name not in HEADS:
        raise ValueError(f"{name!r} is not a head; heads: {', '.join(HEADS)}")
    return name
