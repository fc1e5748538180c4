"""`mlm`: masked LM. BERT-style masking (stages/runtime/masking.py: 80 % [MASK], 10 % random, 10 % kept, drawn
from (seed, example, epoch) alone); the rows are the masked positions, and only they are projected onto the
vocabulary (`Rows`). An eval split is masked as EVAL_EPOCH, apart from every training epoch, so a set that is a
stage's own eval file scores its own eval_loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contract.heads import HEADS
from stages.runtime import data, dist, heads
from stages.runtime.dist import Dist
from stages.runtime.heads import Keys, Source, common
from stages.runtime.masking import Masker
from stages.runtime.metrics import language_model_metrics

MASK_PROB = 0.15


class Rows(nn.Module):
    """The masked positions' logits, (masked tokens, vocabulary).

    Runs the encoder, gathers the masked positions' hidden states and applies the MLM head only to those: the
    vocabulary projection dominates a small model's step, and ~85 % of it would be thrown away. Falls back to the
    model's whole logits when the head is not one child module. Without labels: every position's logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # a transformers PreTrainedModel (base_model, base_model_prefix, a head)
        heads = [name for name, _ in model.named_children() if name != model.base_model_prefix]
        self.head = heads[0] if len(heads) == 1 else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **extra: torch.Tensor) -> torch.Tensor:
        selected = labels != -100 if labels is not None else attention_mask >= 0
        if self.head is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[selected]
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        return getattr(self.model, self.head)(hidden[selected])


class Head:
    name = "mlm"
    metrics = HEADS["mlm"].metrics
    classes: list[str | int] | None = None

    def __init__(self, source: Source, splits: dict[str, Any], mask_prob: float) -> None:
        self.source, self.splits = source, splits
        self.masker = Masker(source.tokenizer, mask_prob, source.seed)
        self.ends = self.masker.special.tolist()  # a curriculum phase's max_length keeps the final [SEP]

    def auto(self) -> Any:
        return heads.auto(self.name)

    def model_args(self, from_config: bool) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return ", ".join(f"{split} {len(ds)} samples" for split, ds in self.splits.items() if ds is not None)

    def batch(self, split: str, keys: Keys, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """The rows of `keys`, masked as (index, epoch) draws; a padding row's labels are all -100."""
        rows, real = common.real(keys)
        batch = data.collate(self.splits[split], rows, self.source.tokenizer.pad_token_id, max_length, self.ends)
        self.masker(batch, [(i, epoch) for i, (_, epoch) in zip(rows, keys, strict=True)])
        batch["labels"][~real] = -100
        return dist.to_device(batch)

    def module(self, model: nn.Module) -> nn.Module:
        return Rows(model)

    def select(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return common.select_labelled(logits, batch)

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return common.labelled_targets(batch)

    def examples(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return common.labelled_examples(batch)

    def loss(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The sum over the masked tokens divided by their number: the mean, as it was always computed here.
        return F.cross_entropy(rows.float(), self.targets(batch), reduction="sum") / len(rows)

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
    mask_prob = float(source.options.get("mask_prob") or MASK_PROB)
    if source.eval_only:
        raw = {"eval": data.load_eval(source.data, source.cache_dir, source.key)}
    else:
        raw = data.load_section(source.data, source.cache_dir, train=source.train, key=source.key)
    splits = data.tokenize_data(source.data, source.cache_dir, raw, source.tokenizer, source.tokenizer_digest,
                                source.difficulty)
    return Head(source, splits, mask_prob)
