"""A prepare stage's final/: shards of token ids written once (stages/prepare.py), read by position.

Each shard is two .npy files (contract.kinds.prepare): its documents' token ids one after another, uint16 where the
vocabulary fits in 16 bits, else uint32 (as Megatron's indexed datasets and OLMo's token files), and an int64 index
of where each document starts (and where the last one ends). A split is its shards one after another: one stream of
tokens, read through memory maps, so a reader's start-up and memory do not grow with the corpus.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from contract.kinds.prepare import FORMAT, PREPARED_FILE, SHARD_INDEX, SHARD_TOKENS
from contract.spec import vocabulary
from stages.runtime.spec import SpecError


def dtype_for(vocabulary_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocabulary_size <= 2**16 else np.uint32)


def shard_names(split: str, index: int) -> tuple[str, str]:
    """(tokens file, index file) of shard `index` of `split`."""
    return SHARD_TOKENS.format(split=split, index=index), SHARD_INDEX.format(split=split, index=index)


def shard_done(folder: Path, split: str, index: int) -> bool:
    """Whether the shard was written whole (each file is renamed into place once complete, the index last)."""
    return all((folder / name).is_file() for name in shard_names(split, index))


def write_shard(folder: Path, split: str, index: int, documents: list[list[int]], dtype: np.dtype) -> None:
    """Shard `index` of `split` from its documents' token ids, each file written under a temporary name, flushed and
    renamed, the index last: a killed writer leaves no shard that `shard_done` counts."""
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter(itertools.chain.from_iterable(documents), dtype=dtype, count=int(offsets[-1]))
    for name, array in zip(shard_names(split, index), (tokens, offsets), strict=True):
        tmp = folder / f"{name}.{os.getpid()}.tmp"  # a writer of its own: another (a stray rank) never shares it
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)


def load(folder: str | Path, key: str = "inputs.data") -> dict[str, Any]:
    """prepared.json of a prepare stage's final/, checked for its format."""
    path = Path(folder, PREPARED_FILE)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"{key}: {path}: cannot read the prepared data's description: {e}") from None
    if meta.get("format") != FORMAT:
        raise SpecError(f"{key}: {path}: format {meta.get('format')!r}, this baton reads format {FORMAT}; "
                        "run the prepare stage again")
    return meta


def check_tokenizer(meta: dict[str, Any], tokenizer: Any, key: str = "inputs.data") -> None:
    """Exit 2 unless `tokenizer` reads the prepared token ids as the tokens they were made from."""
    if meta["tokenizer"]["vocabulary"] != vocabulary(tokenizer):
        raise SpecError(f"{key}: the corpus was prepared with another tokenizer (vocabulary "
                        f"{meta['tokenizer']['vocabulary']}, {meta['tokenizer']['size']} tokens) than this stage's "
                        f"({vocabulary(tokenizer)}, {len(tokenizer)} tokens); give the stage the prepare stage's "
                        "tokenizer")


class Stream:
    """The tokens of one split: its shards one after another, memory-mapped."""

    def __init__(self, folder: str | Path, split: dict[str, Any]) -> None:
        self.shards = [np.load(Path(folder, s["tokens"]), mmap_mode="r") for s in split["shards"]]
        self.starts = np.cumsum([0, *map(len, self.shards)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def span(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream, as int64."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, at = [], start
        for i in range(first, len(self.shards)):
            if at >= end:
                break
            lo = at - int(self.starts[i])
            take = min(end - at, len(self.shards[i]) - lo)
            pieces.append(self.shards[i][lo : lo + take])
            at += take
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)


class Blocks:
    """A split's token stream cut into blocks of exactly block_size tokens (the rest, under one block, dropped): what
    `datasets` gives clm's own packing, `blocks[rows]["input_ids"]`, each block read in O(1)."""

    def __init__(self, stream: Stream, block_size: int) -> None:
        self.stream, self.block_size = stream, block_size

    def __len__(self) -> int:
        return len(self.stream) // self.block_size

    def __getitem__(self, rows: list[int]) -> dict[str, np.ndarray]:
        b = self.block_size
        for r in rows:
            if not 0 <= r < len(self):
                raise IndexError(f"block {r} of {len(self)}")
        ids = [self.stream.span(r * b, (r + 1) * b) for r in rows]
        return {"input_ids": np.stack(ids) if ids else np.zeros((0, b), np.int64)}
