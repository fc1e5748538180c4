"""A language model's eval metrics from its loss sums."""

from __future__ import annotations

import math

import torch

from stages.runtime import dist


def language_model_metrics(total: torch.Tensor) -> dict[str, float]:
    """Collective. eval_loss (mean per predicted token) and perplexity from this rank's [loss sum, tokens]."""
    dist.all_reduce_sum(total)
    loss = float(total[0] / total[1]) if total[1] else float("nan")
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 80.0))}
