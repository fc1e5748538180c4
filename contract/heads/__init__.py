"""The registry of heads, the contract's half: every module in this package is one objective (what a model predicts)
and says what the launcher must know of it without torch: its metrics, which shared eval sets score it, the model
class it is. The stage's half, which trains and evaluates it, is stages/runtime/heads/<head>.py.

A head module defines `HEAD`, a `HeadInfo` named as the module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class HeadInfo:
    name: str
    metrics: tuple[str, ...]  # what its eval reports (a gate or a variants' selection may name them)
    fits: Literal["classify", "text"]  # the shared eval sets (manifest `evals:`, their task) it is scored on
    model: str  # the transformers class of its model, for messages
    classes: Literal["num_labels", "vocab_size"]  # what its logits range over (a teacher must have as many)


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


def check(name: str) -> str:
    """`name` if it is a head; a ValueError naming the heads otherwise (pydantic turns it into the key's error)."""
    if name not in HEADS:
        raise ValueError(f"{name!r} is not a head; heads: {', '.join(HEADS)}")
    return name
