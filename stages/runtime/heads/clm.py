"""`clm`: causal LM. Training reads documents packed into full blocks (stages/runtime/packing.py: each document
followed by the end-of-document token, cut into blocks of exactly block_size tokens, no padding); a shared eval
set reads each line as one document cut to the set's max_length, batches padded on the right. Position j predicts
token j + 1: the rows are every position whose next token is real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contract.heads import HEADS
from contract.sections import BLOCK_SIZE
from stages.runtime import data, dist, heads, packing, prepared
from stages.runtime.dist import Dist
from stages.runtime.heads import Keys, Source, common
from stages.runtime.metrics import language_model_metrics
from stages.runtime.spec import SpecError


class Rows(nn.Module):
    """The causal LM's rows of logits for a batch (no key/value cache: that is for generation); without labels,
    every position's but the last."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **inputs: torch.Tensor
                ) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, use_cache=False, **inputs).logits
        return select(logits, {"labels": input_ids if labels is None else labels})


def select(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return logits[:, :-1][predicted(batch)]


def targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["labels"][:, 1:][predicted(batch)]


def examples(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return predicted(batch).nonzero()[:, 0]


def predicted(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where position j's next token is one that counts (labels shifted by one), (rows, positions − 1)."""
    return batch["labels"][:, 1:] != -100


class Head:
    name = "clm"
    metrics = HEADS["clm"].metrics
    classes: list[str | int] | None = None

    def __init__(self, source: Source, splits: dict[str, Any], eos: int, block_size: int | None) -> None:
        self.source, self.splits, self.eos, self.block_size = source, splits, eos, block_size
        tokenizer = source.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # masked out either way

    def auto(self) -> Any:
        return heads.auto(self.name)

    def model_args(self, from_config: bool) -> dict[str, Any]:
        # A model built from a config ends documents (and generate()) with the token the data does.
        return {"eos_token_id": self.eos} if from_config else {}

    def describe(self) -> str:
        return ", ".join(f"{split} {len(ds)} blocks of {self.block_size} tokens" for split, ds in self.splits.items()
                         if ds is not None)

    def batch(self, split: str, keys: Keys, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Blocks (full rows, no attention mask), cut to `max_length` (a curriculum phase's shorter blocks); a shared
        eval set's documents padded on the right."""
        rows, real = common.real(keys)
        ds = self.splits[split]
        if self.block_size is not None:
            ids = torch.tensor(ds[rows]["input_ids"])[:, :max_length]
            batch = {"input_ids": ids, "labels": ids.masked_fill(~real[:, None], -100)}
        else:
            batch = data.collate(ds, rows, self.pad)
            keep = batch["attention_mask"].bool() & real[:, None]
            batch["labels"] = batch["input_ids"].masked_fill(~keep, -100)
        return dist.to_device(batch)

    def module(self, model: nn.Module) -> nn.Module:
        return Rows(model)

    def select(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return select(logits, batch)

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return targets(batch)

    def examples(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return examples(batch)

    def loss(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(rows.float(), targets(batch))

    def sums(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return common.lm_sums(rows, self.targets(batch))

    def metrics_of(self, total: torch.Tensor) -> dict[str, float]:
        return language_model_metrics(total)

    def evaluate(self, net: Any, split: str, batch_size: int, d: Dist, predictions: str | None = None
                 ) -> dict[str, float]:
        return common.evaluate(self, net, split, batch_size, d)

    def example_losses(self, net: Any, indices: list[int]) -> torch.Tensor:
        return common.example_losses(self, net, indices)


def load(source: Source) -> Head:
    tokenizer = source.tokenizer
    eos = packing.end_of_document(tokenizer)
    if source.eval_only:
        raw = data.load_eval(source.data, source.cache_dir, source.key)
        return Head(source, {"eval": documents(source, raw, eos)}, eos, None)
    block_size = int(source.options.get("block_size") or BLOCK_SIZE)
    if source.prepared is not None:
        return Head(source, prepared_blocks(source.prepared, tokenizer, block_size), eos, block_size)
    raw = data.load_section(source.data, source.cache_dir, train=source.train, key=source.key)
    packed = packing.pack(source.data, source.cache_dir, source.tokenizer_digest, raw, tokenizer, eos, block_size)
    return Head(source, {split: p.blocks if p else None for split, p in packed.items()}, eos, block_size)


def prepared_blocks(folder: str, tokenizer: Any, block_size: int) -> dict[str, Any]:
    """The splits of a prepare stage's output as blocks read from its token files: one stream of documents per
    split cut into blocks of block_size, as `packing.pack` cuts a corpus of at most PACK_BATCH documents (it drops
    a remainder per PACK_BATCH documents, this one remainder per split)."""
    meta = prepared.load(folder)
    prepared.check_tokenizer(meta, tokenizer)
    splits: dict[str, Any] = {"train": None, "eval": None}
    for split, described in meta["splits"].items():
        splits[split] = prepared.Blocks(prepared.Stream(folder, described), block_size)
        if len(splits[split]) == 0:
            raise SpecError(f"inputs.data: the prepared {split} split makes no block of clm.block_size {block_size} "
                            f"tokens: {described['documents']} documents, {described['tokens']} tokens")
    return splits


def documents(source: Source, raw: Any, eos: int) -> Any:
    """A shared eval set's lines as clm reads documents (no special tokens, then `eos`; blank lines are none), each
    cut to max_length tokens; cached under cache_dir, each rank tokenizing a share."""
    s, tokenizer = source.data, source.tokenizer
    field = s.text_field

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [text for text in batch[field] if isinstance(text, str) and text.strip()]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [(doc + [eos])[: s.max_length] for doc in ids]}

    out_dir = Path(source.cache_dir, "tokenized")
    cached = data.cache_key("shared-clm-documents", source.tokenizer_digest, raw._fingerprint, field, eos, s.max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = data.map_by_rank(raw, encode, key=cached, path=out_dir / f"shared-clm-{cached}",
                            remove_columns=raw.column_names)
    if len(docs) == 0:
        raise SpecError(f"{source.key}: no line with text in {s.eval_files or 'the eval split'}")
    return docs
