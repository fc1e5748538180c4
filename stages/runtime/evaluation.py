"""The eval loops stages share: a split sharded over the ranks (`data.eval_shards`: equal batch counts, padding
rows marked -1, as ZeRO-3 needs every rank in every forward pass), sums all-reduced, metrics on the CPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from stages.runtime import data, dist
from stages.runtime.dist import Dist
from stages.runtime.labels import macro_f1
from stages.runtime.metrics import language_model_metrics


def classification(n: int, micro: int, d: Dist, logits_of: Callable[[list[int]], torch.Tensor],
                   labels: torch.Tensor, num_labels: int, predictions: str | None = None) -> dict[str, float]:
    """Collective. accuracy, macro_f1 and eval_loss over the `n` eval examples, whose label ids are `labels`.

    `logits_of(indices)` gives a batch's logits; a padding row comes as index 0 and counts for nothing. With
    `predictions`, rank 0 writes that file: per example {"index", "label", "pred", "logits"}, in eval order."""
    mine: list[int] = []  # this rank's examples, in the order of `logits`
    parts = []
    with torch.no_grad():
        for indices in data.eval_shards(n, micro, d.world_size, d.rank):
            real = [j for j, i in enumerate(indices) if i >= 0]
            parts.append(logits_of([max(i, 0) for i in indices]).float().cpu()[real])
            mine += [indices[j] for j in real]
    logits = torch.cat(parts) if parts else torch.zeros(0, num_labels)
    if predictions:
        preds = logits.argmax(-1)
        rows: list[dict[str, Any]] = [
            {"index": i, "label": int(labels[i]), "pred": int(preds[j]), "logits": logits[j].tolist()}
            for j, i in enumerate(mine)]
        gathered = dist.all_gather_objects(rows)
        if dist.is_main():
            ordered = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            with open(predictions, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in ordered)
    return classification_metrics(logits, labels[mine], num_labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Collective. accuracy, macro_f1 and eval_loss (mean cross-entropy) of this rank's `logits` [examples,
    labels] against their label ids, summed over the ranks."""
    k = num_labels
    loss = F.cross_entropy(logits.float(), labels, reduction="sum").double().reshape(1)
    confusion = torch.bincount(labels * k + logits.argmax(-1), minlength=k * k).double()
    dist.all_reduce_sum(loss)
    dist.all_reduce_sum(confusion)
    confusion = confusion.view(k, k)
    total = float(confusion.sum())
    return {"accuracy": float(confusion.trace()) / total, "macro_f1": macro_f1(confusion),
            "eval_loss": float(loss) / total}


def language_model(n: int, micro: int, d: Dist,
                   loss_of: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Collective. eval_loss (per predicted token) and perplexity over the `n` eval examples: `loss_of(indices)`
    gives a batch's (loss sum, predicted tokens), counting nothing for a padding row (index -1)."""
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for indices in data.eval_shards(n, micro, d.world_size, d.rank):
            loss_sum, count = loss_of(indices)
            total += torch.tensor([float(loss_sum), float(count)], dtype=torch.float64)
    return language_model_metrics(total)
