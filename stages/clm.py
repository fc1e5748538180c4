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

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from contract.kinds.clm import ClmOptions
from contract.layout import EXIT_STOPPED
from stages.runtime import data, dist, entry, lifecycle, models
from stages.runtime.dist import Dist
from stages.runtime.metrics import language_model_metrics
from stages.runtime.spec import Spec, SpecError, training

# Documents per datasets .map batch. Each batch's remainder (< block_size tokens) is dropped, so the
# blocks depend on this number: fixed, not tuned per machine, and large, so that few tokens are lost.
PACK_BATCH = 10_000


def end_of_document(tokenizer) -> int:
    """The token that follows each document."""
    for name in ("eos_token_id", "sep_token_id"):
        if (token := getattr(tokenizer, name, None)) is not None:
            return int(token)
    raise SpecError("inputs.tokenizer: has neither an EOS nor a SEP token to end each document with")


def check_block_size(spec: Spec, block_size: int) -> None:
    """clm.block_size against the init model's positions, where its config says: before any data work,
    which can take long on a real corpus."""
    from transformers import AutoConfig

    init = spec.ref("init")
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
        raise SpecError(f"clm.block_size: {block_size} tokens exceed the {limit} positions of the model "
                        f"(inputs.init, n_positions / max_position_embeddings); lower clm.block_size")


@dataclass(frozen=True)
class Packed:
    documents: Any  # a datasets.Dataset: input_ids per document, end-of-document token included
    blocks: Any  # a datasets.Dataset: input_ids rows of exactly block_size tokens


def pack(spec: Spec, raw: dict[str, Any], tokenizer, eos: int, block_size: int) -> dict[str, Packed | None]:
    """Each split's documents and blocks, cached under cache_dir; rank 0 fills the cache first.

    Two cached steps, as in run_clm: documents → token ids, then → blocks (a new block_size only regroups).
    """
    field = spec.data.text_field
    out_dir = Path(spec.cache_dir, "tokenized")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [text for text in batch[field] if isinstance(text, str) and text.strip()]  # blank: no document
        # verbose=False: documents longer than the tokenizer's model_max_length are expected; packing cuts them.
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block_size * block_size  # the batch's remainder is dropped
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    out: dict[str, Packed | None] = {}
    with data.rank0_first():
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, ds in raw.items():
            if ds is None:
                out[split] = None
                continue
            key = data.cache_key("clm-documents", data.tokenizer_digest(spec), ds._fingerprint, field, eos)
            docs = ds.map(encode, batched=True, batch_size=PACK_BATCH, remove_columns=ds.column_names,
                          new_fingerprint=key, cache_file_name=str(out_dir / f"clm-{split}-{key}.arrow"))
            key = data.cache_key("clm-blocks", key, block_size, PACK_BATCH)
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


def main(spec: Spec, d: Dist) -> int:
    from transformers import AutoModelForCausalLM

    opts = spec.options_as(ClmOptions)
    micro = training(spec).train.micro_batch_size
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
    return t.finish(evaluate, tokenizer)


if __name__ == "__main__":
    entry.run(main)
