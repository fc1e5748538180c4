"""`classify`: sequence-classification fine-tuning; eval reports accuracy, macro-F1 and loss."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from contract.sections import Head, Layerwise, TrainingStage

Profile = Literal["last_only", "linear", "uniform"]


def layer_weights(weights: list[float] | Profile, num_layers: int) -> list[float]:
    """α_1 … α_L of deep supervision for a model of `num_layers` layers: a profile's or the manifest's own
    (whose length is checked here: ValueError). last_only: the plain loss; linear: α_l ∝ l; uniform: 1/L;
    the profiles sum to 1, so the loss keeps the scale of plain classification."""
    if weights == "last_only":
        return [0.0] * (num_layers - 1) + [1.0]
    if weights == "linear":
        return [2 * layer / (num_layers * (num_layers + 1)) for layer in range(1, num_layers + 1)]
    if weights == "uniform":
        return [1 / num_layers] * num_layers
    if len(weights) != num_layers:
        raise ValueError(f"{len(weights)} weights but the model has {num_layers} layers (num_hidden_layers): "
                         "give one per layer, or a profile (last_only, linear, uniform)")
    return list(weights)


class ClassifyLayerwise(Layerwise):
    """Layer-wise fine-tuning: gradual unfreezing, deep supervision (train.layer_lr_decay: the rate decay)."""

    deep_supervision: list[float] | Profile = Field(
        "last_only", description="Deep supervision, L = Σ_l α_l · L_l: a small head on each supervised layer's "
        "mean-pooled output (the last layer's is the model's own classifier). α_1 … α_L, one per transformer "
        "layer (each ≥ 0, at least one > 0), or a profile: last_only (plain classification), linear "
        "(α_l ∝ l), uniform; the profiles sum to 1. The extra heads are training-only: final/ has none.",
    )

    @field_validator("deep_supervision", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise ValueError(f"{value!r}: numbers are expected (α per layer)")
        if any(not math.isfinite(v) or v < 0 for v in value):
            raise ValueError(f"{value!r}: each α must be a finite number ≥ 0")
        if not any(v > 0 for v in value):
            raise ValueError(f"{value!r}: at least one α must be > 0")
        return value


class ClassifyStage(TrainingStage):
    options_field: ClassVar[str | None] = "layerwise"
    scores_train: ClassVar[bool] = True
    head: ClassVar[Head | None] = "classify"

    kind: Literal["classify"] = Field(description="Sequence-classification fine-tuning; eval: accuracy, macro-F1.")
    layerwise: ClassifyLayerwise = Field(default_factory=ClassifyLayerwise,
                                         description="Layer-wise fine-tuning: gradual unfreezing, deep supervision.")


STAGE = ClassifyStage
