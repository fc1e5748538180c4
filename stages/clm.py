"""Causal-LM pretraining: a GPT-2 / Llama / Qwen-style decoder learns to predict the next token.

    python -m torch.distributed.run --nproc_per_node N -m stages.clm --spec spec.json

As Hugging Face's run_clm does, every document is tokenized without special
tokens and followed by the end-of-document token (the tokenizer's EOS, or its
[SEP] where it has none, as baton's own tokenizer), and the token stream is cut
into blocks of exactly clm.block_size tokens. Blocks are all full: no padding,
no attention mask, no compute spent on padding. A block may span documents; the
end-of-document token tells the model where one ends. Eval reports perplexity
over every eval block. The objective: stages/runtime/heads/clm.py.
"""

from __future__ import annotations

import torch

from contract.kinds.clm import ClmOptions
from contract.layout import EXIT_STOPPED
from stages.runtime import entry, heads, lifecycle, models
from stages.runtime.dist import Dist
from stages.runtime.packing import PACK_BATCH, Packed, check_block_size, end_of_document, pack
from stages.runtime.spec import TrainingSpec

__all__ = ["PACK_BATCH", "Packed", "check_block_size", "end_of_document", "main", "pack"]  # tests import them from here


def main(spec: TrainingSpec, d: Dist) -> int:
    opts = spec.options_as(ClmOptions)
    micro = spec.train.micro_batch_size
    check_block_size(spec, opts.block_size)  # before any data work, which can take long on a real corpus
    tokenizer = models.load_tokenizer(spec)
    head = heads.of(spec, "clm", tokenizer, block_size=opts.block_size)
    train = head.splits["train"]

    from_config = spec.ref("init").source == "config"
    t = lifecycle.start(
        spec, d, num_samples=len(train), what=f"clm, {head.describe()}", wrap=head.module,
        build=lambda resume: models.build_model(spec, head.auto(), tokenizer, resume=resume,
                                                **head.model_args(from_config)),
    )

    def micro_step(keys: list[tuple[int, int]]) -> torch.Tensor:
        batch = head.batch("train", keys, t.sampler.max_length)  # a curriculum phase's shorter blocks
        return head.loss(t.engine(**batch), batch)

    def evaluate(step: int) -> dict[str, float]:
        t.engine.eval()
        return head.evaluate(t.engine, "eval", micro, d)

    if t.fit(micro_step, evaluate, tokenizer, head=head):
        return EXIT_STOPPED
    return t.finish(evaluate)


if __name__ == "__main__":
    entry.run_training(main)
