"""Masked-LM pretraining, and domain-adaptive continued pretraining (init.from an earlier stage).

    python -m torch.distributed.run --nproc_per_node N -m stages.mlm --spec spec.json

Masking and the loss at masked positions: stages/runtime/masking.py.
"""

from __future__ import annotations

import torch

from contract.kinds.mlm import MlmOptions
from contract.layout import EXIT_STOPPED
from stages.runtime import curriculum, data, dist, entry, evaluation, lifecycle, models
from stages.runtime.dist import Dist
from stages.runtime.masking import EVAL_EPOCH, MaskedLMLoss, Masker
from stages.runtime.spec import TrainingSpec


def main(spec: TrainingSpec, d: Dist) -> int:
    opts = spec.options_as(MlmOptions)
    micro = spec.train.micro_batch_size

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

        def loss_of(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            batch = batch_of(evalset, [(max(i, 0), EVAL_EPOCH) for i in indices])
            batch["labels"][torch.tensor(indices) < 0] = -100  # padding rows: forward pass only
            return t.engine(**dist.to_device(batch))

        return evaluation.language_model(len(evalset), micro, d, loss_of)

    def example_losses(indices: list[int]) -> torch.Tensor:
        """Each example's mean loss over its masked tokens, masked as the eval split is (0 with none)."""
        sums, counts = t.engine(**dist.to_device(batch_of(train, [(i, EVAL_EPOCH) for i in indices])), per_row=True)
        return sums / counts.clamp(min=1)

    if t.fit(micro_step, evaluate):
        return EXIT_STOPPED
    return t.finish(evaluate, tokenizer, losses=example_losses, task="mlm", mask_prob=opts.mask_prob)


if __name__ == "__main__":
    entry.run_training(main)
