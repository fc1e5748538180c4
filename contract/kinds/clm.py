"""`clm`: causal-LM pretraining (GPT-2 / Llama-style decoders) on documents packed into full blocks."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from contract.sections import BLOCK_SIZE, Head, Strict, TrainingStage


class ClmOptions(Strict):
    block_size: int = Field(
        BLOCK_SIZE, ge=8, le=1_048_576, strict=True,
        description="Tokens per training block: the documents, each followed by the end-of-document token, are "
        "concatenated and cut into blocks of exactly this length (no padding); at most the model's maximum "
        "positions. data.max_length does not apply.",
    )


class ClmStage(TrainingStage):
    options_field: ClassVar[str | None] = "clm"
    head: ClassVar[Head | None] = "clm"
    reads_prepared: ClassVar[bool] = True

    kind: Literal["clm"] = Field(description="Causal-LM pretraining (next-token prediction); eval: perplexity.")
    clm: ClmOptions = Field(default_factory=ClmOptions, description="Packing settings.")


STAGE = ClmStage
