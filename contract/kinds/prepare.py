"""`prepare`: a corpus tokenized once into sharded, memory-mapped token files with an index, so that a later stage
(its `data: {from: <this stage>}`) reads its token ids by position instead of tokenizing at start. Nothing is
trained; final/ holds per split the shards (SHARD_TOKENS, SHARD_INDEX), what they are (PREPARED_FILE) and the
tokenizer.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from contract.sections import StageBase, Strict, TokenizerRef

FORMAT = 1  # of final/: a reader refuses another
PREPARED_FILE = "prepared.json"  # in final/: format, tokenizer, sources, counts, the shards of each split
SHARD_TOKENS = "{split}-{index:05d}.tokens.npy"  # a shard's documents' token ids one after another (uint16/uint32)
SHARD_INDEX = "{split}-{index:05d}.index.npy"  # int64: where each document starts, and the end (documents + 1)


class PrepareOptions(Strict):
    shard_rows: int = Field(100_000, ge=1, le=10**9, strict=True,
                            description="Rows of the corpus per shard: the unit of work a rank tokenizes and "
                            "writes at once, and what a killed preparation resumes from. The shards, and so "
                            "final/, do not depend on the world size.")


class PrepareStage(StageBase):
    gives: ClassVar[frozenset[str]] = frozenset({"prepared", "tokenizer"})
    options_field: ClassVar[str | None] = "prepare"

    kind: Literal["prepare"] = Field(description="Tokenize a corpus once into sharded, memory-mapped token files "
                                     "with an index; a later stage reads it with data: {from: <this stage>}.")
    tokenizer: TokenizerRef = Field(description="The tokenizer: an earlier stage (from) or a folder / hub name "
                                    "(pretrained); the stages that read the prepared data must use the same one.")
    prepare: PrepareOptions = Field(default_factory=PrepareOptions, description="Sharding settings.")

    def metric_names(self) -> frozenset[str]:
        return frozenset({"documents", "tokens"})  # of the train split


STAGE = PrepareStage
