"""`prune`: structured pruning into a genuinely smaller model: FFN neurons, attention heads (kv groups) and whole
layers, ranked by importance on calibration batches (stages/runtime/pruning.py)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from contract.sections import Head, ModelRef, Problem, StageBase, Strict, TokenizerRef


class PruneOptions(Strict):
    task: Literal["classify", "mlm"] = Field(
        description="What the model is and how it is scored: classify (AutoModelForSequenceClassification; "
        "data label_field, the model's own labels) or mlm (AutoModelForMaskedLM; masked as mlm's eval).",
    )
    importance: Literal["magnitude", "gradient", "activation"] = Field(
        "activation", description="How FFN neurons and heads are ranked: magnitude (L2 norm of their weights; "
        "needs no data), gradient (Σ |w · ∂L/∂w| over the calibration batches), activation (mean |activation| "
        "over the calibration tokens, Minitron's). Layers are always ranked by block importance on calibration.",
    )
    ffn: float | None = Field(None, gt=0, le=1, description="Share of FFN neurons each layer keeps.")
    heads: float | None = Field(None, gt=0, le=1, description="Share of attention heads each layer keeps, in "
                                "whole key-value groups; models whose config states head_dim (llama, qwen2, "
                                "mistral) only.")
    layers: int | None = Field(None, ge=1, le=100_000, strict=True,
                               description="Transformer layers kept (those with the most block importance).")
    calibration_batches: int = Field(8, ge=1, le=100_000, strict=True,
                                     description="Batches of the train split, per rank, that importance is "
                                     "measured on (a seeded sample).")
    micro_batch_size: int = Field(8, ge=1, le=65536, strict=True,
                                  description="Examples per rank per forward pass (calibration and eval).")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="mlm: share of tokens masked.")

    @field_validator("ffn", "heads", "mask_prob", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"{value!r}: a number is expected, not a boolean")
        return value

    @model_validator(mode="after")
    def _something(self) -> PruneOptions:
        if self.ffn is None and self.heads is None and self.layers is None:
            raise ValueError("nothing to prune: give ffn, heads or layers")
        return self

    @property
    def calibrates(self) -> bool:
        return self.importance != "magnitude" or self.layers is not None


class PruneStage(StageBase):
    gives: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer"})
    options_field: ClassVar[str | None] = "prune"
    same_vocabulary: ClassVar[tuple[tuple[str, str], ...]] = (("init", "tokenizer"),)
    tokenizer_from: ClassVar[str | None] = "init"

    kind: Literal["prune"] = Field(description="Structured pruning: a smaller model that from_pretrained loads.")
    init: ModelRef = Field(description="The model to prune: an earlier stage or a local folder / hub name.")
    tokenizer: TokenizerRef | None = Field(None, description="Default: the tokenizer saved with the init model.")
    prune: PruneOptions = Field(description="What to cut and how units are ranked.")

    def model_head(self) -> Head | None:
        return self.prune.task

    def metric_names(self) -> frozenset[str]:
        task = super().metric_names()
        return task | {f"before/{m}" for m in task} | {"params_before", "params_after"}

    @model_validator(mode="after")
    def _inputs(self) -> PruneStage:
        if self.init.config is not None:
            raise Problem(("init", "config"), "a model built from a config has nothing learnt to prune: give "
                          "init.from or init.pretrained")
        return self


STAGE = PruneStage
