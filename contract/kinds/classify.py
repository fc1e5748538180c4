"""`classify`: sequence-classification fine-tuning; eval reports accuracy, macro-F1 and loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.sections import TrainingStage


class ClassifyStage(TrainingStage):
    kind: Literal["classify"] = Field(description="Sequence-classification fine-tuning; eval: accuracy, macro-F1.")


STAGE = ClassifyStage
