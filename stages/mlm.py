"""Masked-LM pretraining, and domain-adaptive continued pretraining (init.source=stage).

    python -m torch.distributed.run --nproc_per_node N -m stages.mlm --spec spec.json

BERT-style masking (80 % [MASK], 10 % random token, 10 % unchanged) whose
randomness derives from (seed, sample index, epoch) alone, so a resumed run
masks exactly as an uninterrupted one. The loss is computed only at masked
positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contract.kinds.mlm import MlmOptions
from contract.layout import EXIT_STOPPED
from stages.runtime import curriculum, data, dist, entry, lifecycle, models
from stages.runtime.dist import Dist
from stages.runtime.metrics import language_model_metrics
from stages.runtime.spec import Spec, SpecError, training

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

    def forward(self, input_ids, attention_mask, labels, **extra) -> tuple[torch.Tensor, torch.Tensor]:
        selected = labels != -100
        n = selected.sum()
        if self.head is None:
            loss = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra).loss
            return torch.where(n > 0, loss * n, torch.zeros_like(loss)), n
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        logits = getattr(self.model, self.head)(hidden[selected])
        return F.cross_entropy(logits.float(), labels[selected], reduction="sum"), n


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


def main(spec: Spec, d: Dist) -> int:
    opts = spec.options_as(MlmOptions)
    micro = training(spec).train.micro_batch_size

    # Tokenizer and data.
    from transformers import AutoModelForMaskedLM

    tokenizer = models.load_tokenizer(spec)
    splits = data.tokenize(spec, data.load_raw(spec), tokenizer, data.tokenizer_digest(spec))
    train, evalset = splits["train"], splits["eval"]
    masker = Masker(tokenizer, opts.mask_prob, spec.seed)

    def batch_of(split, keys: list[tuple[int, int]], max_length: int | None = None) -> dict[str, torch.Tensor]:
        batch = data.collate(split, [i for i, _ in keys], tokenizer.pad_token_id, max_length, masker.special.tolist())
        masker(batch, keys)
        return batch

    t = lifecycle.start(
        spec, d, num_samples=len(train), what=f"mlm, {len(train)} train samples", wrap=MaskedLMLoss,
        difficulty=curriculum.difficulty(spec, train),
        build=lambda resume: models.build_model(spec, AutoModelForMaskedLM, tokenizer, resume=resume),
    )

    def micro_step(keys: list[tuple[int, int]]) -> torch.Tensor:
        loss_sum, n = t.engine(**dist.to_device(batch_of(train, keys, t.sampler.max_length)))
        return loss_sum / n

    def evaluate(step: int) -> dict[str, float]:
        if evalset is None:
            return {}
        t.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for indices in data.eval_shards(len(evalset), micro, d.world_size, d.rank):
                batch = batch_of(evalset, [(max(i, 0), EVAL_EPOCH) for i in indices])
                batch["labels"][torch.tensor(indices) < 0] = -100  # padding rows: forward pass only
                loss_sum, n = t.engine(**dist.to_device(batch))
                total += torch.tensor([loss_sum.item(), n.item()], dtype=torch.float64)
        return language_model_metrics(total)

    if t.fit(micro_step, evaluate):
        return EXIT_STOPPED
    return t.finish(evaluate, tokenizer)


if __name__ == "__main__":
    entry.run(main)
