"""Causal-LM pretraining: a GPT-2 / Llama / Qwen-style decoder learns to predict the next token.

    python -m torch.distributed.run --nproc_per_node N -m stages.clm --spec spec.json

As Hugging Face's run_clm does, every document is tokenized without special
tokens and followed by the end-of-document token (the tokenizer's EOS, or its
[SEP] where it has none, as baton's own tokenizer), and the token stream is cut
into blocks of exactly clm.block_size tokens. Blocks are all full: no padding,
no attention mask, no compute spent on padding. A block may span documents; the
end-of-document token tells the model where one ends. Eval reports perplexity
over every eval block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from contract.kinds.clm import ClmOptions
from contract.layout import EXIT_STOPPED
from stages.runtime import data, dist, entry, lifecycle, models
from stages.runtime.dist import Dist
from stages.runtime.metrics import language_model_metrics
from stages.runtime.packing import PACK_BATCH, Packed, check_block_size, end_of_document, pack
from stages.runtime.spec import TrainingSpec

__all__ = ["PACK_BATCH", "Packed", "check_block_size", "end_of_document", "main", "pack"]  # tests import them from here


def main(spec: TrainingSpec, d: Dist) -> int:
    from transformers import AutoModelForCausalLM

    opts = spec.options_as(ClmOptions)
    micro = spec.train.micro_batch_size
    check_block_size(spec, opts.block_size)

    # Tokenizer and data: documents packed into blocks.
    tokenizer = models.load_tokenizer(spec)
    eos = end_of_document(tokenizer)
    splits = pack(spec, data.load_raw(spec), tokenizer, eos, opts.block_size)
    packed_train, packed_eval = splits["train"], splits["eval"]
    assert packed_train is not None  # load_raw always gives a train split
    train = packed_train.blocks
    evalset = packed_eval.blocks if packed_eval else None

    def blocks(split, indices: list[int]) -> torch.Tensor:
        """Rows `indices` of a split's blocks, on this rank's device: (len(indices), block_size) token ids."""
        return dist.to_device({"input_ids": torch.tensor(split[indices]["input_ids"])})["input_ids"]

    # A model built from a config ends documents (and generate()) with the token the data does.
    eos_override: dict[str, Any] = {"eos_token_id": eos} if spec.ref("init").source == "config" else {}
    what = f"clm, {len(packed_train.documents)} documents → {len(train)} blocks of {opts.block_size} tokens"
    if packed_eval:
        what += f" (eval: {len(packed_eval.documents)} documents → {len(packed_eval.blocks)} blocks)"
    t = lifecycle.start(
        spec, d, num_samples=len(train), what=what,
        build=lambda resume: models.build_model(spec, AutoModelForCausalLM, tokenizer, resume=resume,
                                                **eos_override),
    )

    def micro_step(keys: list[tuple[int, int]]) -> torch.Tensor:
        ids = blocks(train, [i for i, _ in keys])[:, : t.sampler.max_length]  # a curriculum phase's shorter blocks
        # Every row is full, so no attention mask; the model shifts the labels by one itself.
        # use_cache=False: a key/value cache is for generation, here it would only take memory.
        return t.engine(input_ids=ids, labels=ids, use_cache=False).loss

    def evaluate(step: int) -> dict[str, float]:
        if evalset is None:
            return {}
        t.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)  # sum of token losses, tokens predicted
        with torch.no_grad():
            for indices in data.eval_shards(len(evalset), micro, d.world_size, d.rank):
                ids = blocks(evalset, [max(i, 0) for i in indices])
                logits = t.engine(input_ids=ids, use_cache=False).logits
                # Position j predicts token j + 1.
                losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
                # Padding rows (index -1) ran with zero weight: ZeRO-3 needs equal forward counts on every rank.
                real = (torch.tensor(indices, device=ids.device) >= 0).float()
                weights = real.repeat_interleave(ids.shape[1] - 1)
                total += torch.tensor([float(losses @ weights), float(weights.sum())], dtype=torch.float64)
        return language_model_metrics(total)

    if t.fit(micro_step, evaluate):
        return EXIT_STOPPED
    return t.finish(evaluate, tokenizer, task="clm")


if __name__ == "__main__":
    entry.run_training(main)
