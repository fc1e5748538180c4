"""What the heads share: their eval loop, the language models' scoring, and each example's loss. Functions, not a
base class: a head calls the ones that fit it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from stages.runtime import data
from stages.runtime.dist import Dist
from stages.runtime.heads import Head
from stages.runtime.masking import EVAL_EPOCH

PAD = -1  # the index of a padding row in keys (`data.eval_shards`)


def real(keys: list[tuple[int, int]]) -> tuple[list[int], torch.Tensor]:
    """The rows to read for `keys` (a padding row reads row 0) and which of them are real."""
    return [max(i, 0) for i, _ in keys], torch.tensor([i != PAD for i, _ in keys])


# A head whose labels line up with its logits' leading dimensions (classify: a label per row; mlm: per position)


def select_labelled(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return logits[batch["labels"] != -100]


def labelled_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["labels"][batch["labels"] != -100]


def labelled_examples(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"] != -100).nonzero()[:, 0]


def shards(head: Head, split: str, batch_size: int, d: Dist):
    """Collective. Each of this rank's eval batches of `split` (padding rows included: ZeRO-3 needs every rank in
    every forward pass), as collated batches."""
    for indices in data.eval_shards(len(head.splits[split]), batch_size, d.world_size, d.rank):
        yield head.batch(split, [(i, EVAL_EPOCH) for i in indices])


def evaluate(head: Head, net: Any, split: str, batch_size: int, d: Dist) -> dict[str, float]:
    """Collective. The head's metrics of `split` ({} without it): `net(**batch)` gives each batch's rows."""
    if head.splits.get(split) is None:
        return {}
    total: torch.Tensor | None = None
    with torch.no_grad():
        for batch in shards(head, split, batch_size, d):
            sums = head.sums(net(**batch), batch)
            total = sums if total is None else total + sums
    assert total is not None, "every rank has at least one eval batch"
    return head.metrics_of(total)


def lm_sums(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[sum of the rows' losses, rows] in float64, for `language_model_metrics`."""
    loss = F.cross_entropy(rows.float(), targets, reduction="sum")
    return torch.tensor([float(loss), float(len(targets))], dtype=torch.float64)


def example_losses(head: Head, net: Any, indices: list[int]) -> torch.Tensor:
    """Each training example's mean loss over its rows (0 where it has none), as eval reads it."""
    batch = head.batch("train", [(i, EVAL_EPOCH) for i in indices])
    tokens = F.cross_entropy(net(**batch).float(), head.targets(batch), reduction="none")
    rows = head.examples(batch)
    sums = torch.zeros(len(indices), dtype=tokens.dtype, device=tokens.device).index_add_(0, rows, tokens)
    counts = torch.bincount(rows, minlength=len(indices)).clamp(min=1)
    return sums / counts
