"""Masked-LM pretraining, and domain-adaptive continued pretraining (init.from an earlier stage).

    python -m torch.distributed.run --nproc_per_node N -m stages.mlm --spec spec.json

The objective (masking, the loss at masked positions, eval): stages/runtime/heads/mlm.py.
"""

from __future__ import annotations

import torch

from contract.kinds.mlm import MlmOptions
from contract.layout import EXIT_STOPPED
from stages.runtime import curriculum, entry, heads, lifecycle, models
from stages.runtime.dist import Dist
from stages.runtime.spec import TrainingSpec


def main(spec: TrainingSpec, d: Dist) -> int:
    opts = spec.options_as(MlmOptions)
    micro = spec.train.micro_batch_size
    tokenizer = models.load_tokenizer(spec)
    head = heads.of(spec, "mlm", tokenizer, mask_prob=opts.mask_prob)
    train = head.splits["train"]

    t = lifecycle.start(
        spec, d, num_samples=len(train), what=f"mlm, {len(train)} train samples", wrap=head.module,
        difficulty=curriculum.difficulty(spec, train),
        build=lambda resume: models.build_model(spec, head.auto(), tokenizer, resume=resume),
    )

    def micro_step(keys: list[tuple[int, int]]) -> torch.Tensor:
        batch = head.batch("train", keys, t.sampler.max_length)
        return head.loss(t.engine(**batch), batch)

    def evaluate(step: int) -> dict[str, float]:
        t.engine.eval()
        return head.evaluate(t.engine, "eval", micro, d)

    if t.fit(micro_step, evaluate, tokenizer, head=head):
        return EXIT_STOPPED
    return t.finish(evaluate, losses=lambda indices: head.example_losses(t.engine, indices))


if __name__ == "__main__":
    entry.run_training(main)
