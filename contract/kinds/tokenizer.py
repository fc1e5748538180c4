"""`tokenizer`: train a SentencePiece model; final/ is a Hugging Face tokenizer folder."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from contract.sections import StageBase, Strict


class SentencePiece(Strict):
    vocab_size: int = Field(8000, ge=64, le=1_000_000, strict=True,
                            description="Vocabulary size, special tokens included.")
    model_type: Literal["unigram", "bpe"] = Field("unigram", description="SentencePiece algorithm.")
    character_coverage: float = Field(1.0, gt=0, le=1, description="Share of characters the vocabulary covers.")
    max_sentences: int = Field(1_000_000, ge=1, strict=True, description="Lines sampled from the data to train on.")
    lowercase: bool = Field(False, description="Lowercase text before training and encoding.")


class TokenizerStage(StageBase):
    gives: ClassVar[frozenset[str]] = frozenset({"tokenizer"})
    options_field: ClassVar[str | None] = "sentencepiece"
    one_process: ClassVar[bool] = True  # SentencePiece trains in one process

    def metric_names(self) -> frozenset[str]:
        return frozenset({"vocab_size"})

    kind: Literal["tokenizer"] = Field(
        description="Train a SentencePiece tokenizer; saves a Hugging Face tokenizer folder."
    )
    sentencepiece: SentencePiece = Field(default_factory=SentencePiece, description="Tokenizer training settings.")


STAGE = TokenizerStage
