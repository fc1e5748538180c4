"""`mlm`: masked-LM pretraining, and domain-adaptive continued pretraining (init.from an earlier stage)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from contract.sections import Head, Strict, TrainingStage


class MlmOptions(Strict):
    mask_prob: float = Field(
        0.15, gt=0, lt=1, description="Share of tokens masked (80% [MASK], 10% random, 10% kept)."
    )


class MlmStage(TrainingStage):
    options_field: ClassVar[str | None] = "mlm"
    scores_train: ClassVar[bool] = True
    head: ClassVar[Head | None] = "mlm"

    kind: Literal["mlm"] = Field(description="Masked-LM pretraining or continued (domain-adaptive) pretraining.")
    mlm: MlmOptions = Field(default_factory=MlmOptions, description="Masking settings.")


STAGE = MlmStage
