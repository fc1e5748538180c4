"""Masked-LM batches and loss, shared by every stage that trains a masked-LM objective (mlm, multitask).

BERT-style masking (80 % [MASK], 10 % random token, 10 % unchanged) whose randomness derives from
(seed, sample index, epoch) alone, so a resumed run masks exactly as an uninterrupted one; the loss is
computed only at masked positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.runtime import data
from stages.runtime.spec import SpecError

EVAL_EPOCH = -1  # masking stream of the eval split, apart from every training epoch


class MaskedLMLoss(nn.Module):
    """(sum of token losses, number of masked tokens) for a batch whose `labels` are -100 where unmasked.

    Runs the encoder, gathers the masked positions' hidden states, and applies
    the MLM head only to those: the vocabulary projection dominates a small
    model's step, and ~85 % of it would be thrown away. Falls back to the
    model's own `labels` path when the head is not one child module.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # a transformers PreTrainedModel (base_model, base_model_prefix, a head)
        heads = [name for name, _ in model.named_children() if name != model.base_model_prefix]
        self.head = heads[0] if len(heads) == 1 else None

    def forward(self, input_ids, attention_mask, labels, per_row: bool = False,
                **extra) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, masked tokens) of the batch; per_row: both per row of the batch."""
        selected = labels != -100
        n = selected.sum()
        if self.head is None and not per_row:
            loss = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra).loss
            return torch.where(n > 0, loss * n, torch.zeros_like(loss)), n
        if self.head is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[selected]
        else:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
            logits = getattr(self.model, self.head)(hidden[selected])
        if not per_row:
            return F.cross_entropy(logits.float(), labels[selected], reduction="sum"), n
        tokens = F.cross_entropy(logits.float(), labels[selected], reduction="none")
        rows = torch.zeros(len(labels), dtype=tokens.dtype, device=tokens.device)
        return rows.index_add_(0, selected.nonzero()[:, 0], tokens), selected.sum(1)


class Masker:
    def __init__(self, tokenizer, mask_prob: float, seed: int) -> None:
        if tokenizer.mask_token_id is None:
            raise SpecError("tokenizer: has no mask token, which masked-LM training needs")
        self.mask_id, self.vocab = tokenizer.mask_token_id, len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.prob, self.seed = mask_prob, seed

    def __call__(self, batch: dict[str, torch.Tensor], keys: list[tuple[int, int]]) -> None:
        """Masks batch["input_ids"] in place and adds batch["labels"]; row i is sample keys[i] = (index, epoch)."""
        ids = batch["input_ids"]
        labels = torch.full_like(ids, -100)
        for row, (index, epoch) in enumerate(keys):
            length = int(batch["attention_mask"][row].sum())
            # Draws depend on the sample alone (not on the batch's padded width).
            g = torch.Generator().manual_seed(data.seed_of(self.seed, "mask", index, epoch))
            pick, how, random_ids = torch.rand(length, generator=g), torch.rand(length, generator=g), \
                torch.randint(self.vocab, (length,), generator=g)
            tokens = ids[row, :length]
            maskable = ~torch.isin(tokens, self.special)
            chosen = (pick < self.prob) & maskable
            if not chosen.any() and maskable.any():
                # Every sample contributes: a short one may otherwise draw no mask at all.
                chosen[maskable.nonzero()[int(pick[0] * maskable.sum())]] = True
            labels[row, :length] = torch.where(chosen, tokens, -100)
            tokens = torch.where(chosen & (how < 0.8), self.mask_id, tokens)
            tokens = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, tokens)
            ids[row, :length] = tokens
        batch["labels"] = labels
