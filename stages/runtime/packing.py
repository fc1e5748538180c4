"""Causal-LM data: documents, each followed by the end-of-document token, packed into blocks of exactly
block_size tokens (as Hugging Face's run_clm), cached under cache_dir. Shared by clm and distill (task clm)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.spec import DataSpec
from stages.runtime import data
from stages.runtime.spec import Spec, SpecError

# Documents per datasets .map batch. Each batch's remainder (< block_size tokens) is dropped, so the
# blocks depend on this number: fixed, not tuned per machine, and large, so that few tokens are lost.
PACK_BATCH = 10_000


def end_of_document(tokenizer) -> int:
    """The token that follows each document."""
    for name in ("eos_token_id", "sep_token_id"):
        if (token := getattr(tokenizer, name, None)) is not None:
            return int(token)
    raise SpecError("inputs.tokenizer: has neither an EOS nor a SEP token to end each document with")


def check_block_size(spec: Spec, block_size: int, key: str = "clm.block_size", name: str = "init") -> None:
    """`key` (clm.block_size) against the positions of input `name`'s model, where its config says: before any data
    work, which can take long on a real corpus."""
    from transformers import AutoConfig

    init = spec.ref(name)
    try:
        if init.source == "config" and init.config:
            config = AutoConfig.for_model(**init.config)
        elif init.path:
            config = AutoConfig.from_pretrained(init.path)
        else:
            return
    except (OSError, ValueError, TypeError):
        return  # build_model reports a bad init with its own message
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and block_size > limit:
        whose = "model" if name == "init" else name
        raise SpecError(f"{key}: {block_size} tokens exceed the {limit} positions of the {whose} "
                        f"(inputs.{name}, n_positions / max_position_embeddings); lower {key}")


def documents(tokenizer, texts: list[Any], eos: int) -> list[list[int]]:
    """The token ids of each text that is not blank (a blank one is no document), without special tokens, followed
    by the end-of-document token `eos`: what clm packs, and what a prepare stage stores."""
    texts = [text for text in texts if isinstance(text, str) and text.strip()]
    # verbose=False: documents longer than the tokenizer's model_max_length are expected; packing cuts them.
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [doc + [eos] for doc in ids]


@dataclass(frozen=True)
class Packed:
    documents: Any  # a datasets.Dataset: input_ids per document, end-of-document token included
    blocks: Any  # a datasets.Dataset: input_ids rows of exactly block_size tokens


def pack(section: DataSpec, cache_dir: str, tokenizer_digest: str, raw: dict[str, Any], tokenizer, eos: int,
         block_size: int) -> dict[str, Packed | None]:
    """Each split's documents (every rank tokenizes a share) and blocks (rank 0 groups them first), cached under
    cache_dir.

    Two cached steps, as in run_clm: documents → token ids, then → blocks (a new block_size only regroups).
    """
    field = section.text_field
    out_dir = Path(cache_dir, "tokenized")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": documents(tokenizer, batch[field], eos)}

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block_size * block_size  # the batch's remainder is dropped
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    out: dict[str, Packed | None] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, ds in raw.items():
        if ds is None:
            out[split] = None
            continue
        key = data.cache_key("clm-documents", tokenizer_digest, ds._fingerprint, field, eos)
        docs = data.map_by_rank(ds, encode, key=key, path=out_dir / f"clm-{split}-{key}", batch_size=PACK_BATCH,
                                remove_columns=ds.column_names)
        key = data.cache_key("clm-blocks", key, block_size, PACK_BATCH)
        with data.rank0_first():
            blocks = docs.map(group, batched=True, batch_size=PACK_BATCH, remove_columns=docs.column_names,
                              new_fingerprint=key, cache_file_name=str(out_dir / f"clm-{split}-{key}.arrow"))
        out[split] = Packed(docs, blocks)
    # Outside the rank-0-first block, so that every rank fails here alike.
    for split, packed in out.items():
        if packed is not None and len(packed.blocks) == 0:
            tokens = sum(map(len, packed.documents["input_ids"]))
            raise SpecError(f"data: the {split} split makes no block of clm.block_size {block_size} tokens: "
                            f"{len(packed.documents)} documents, {tokens} tokens with their end-of-document tokens")
    return out
