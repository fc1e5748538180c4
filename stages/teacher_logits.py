"""Offline distillation's first half: a frozen teacher's top-k logits for every training row, stored once.

    python -m torch.distributed.run --nproc_per_node N -m stages.teacher_logits --spec spec.json

Nothing is trained, so there is no DeepSpeed engine: every rank holds the whole teacher (stages/runtime/teacher.py,
frozen, eval mode, no_grad), scores a strided share of each split (`data.eval_shards`; padding rows are run and
dropped), and the shares are summed across the ranks (each row is non-zero on one rank only, so the sum is exact).
A row is what distill's loss has a row of logits for: classify one per example (tokenized as data.tokenize does),
clm one per predicted token of each packed block (stages/runtime/packing.py, as distill packs them), rows in example
order. Each row keeps its top_k logits, largest first, with their class / token ids.

final/ (written to final.tmp/, then renamed):

    teacher_logits.safetensors   train.values [rows, k] float32, train.indices [rows, k] int64; eval.* alike
    teacher_logits.json          what the rows are: task, top_k, classes, the data, the teacher (see META_FILE)
    tokenizer files              the tokenizer the rows were made with, so a consumer can check its own

then result.json, whose metrics hold the teacher's top-1 `accuracy` on the eval split where there is one. A stop
request is honoured between two batches: a `stop` record, nothing written, exit 75 (a rerun scores from the start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contract.files import write_json
from contract.kinds.teacher_logits import LOGITS_FILE, META_FILE, TeacherLogitsOptions
from contract.layout import EXIT_DONE, EXIT_STOPPED
from stages.runtime import data, dist, entry, export, loop, models, packing, records, signals, teacher
from stages.runtime.dist import Dist
from stages.runtime.labels import label_ids
from stages.runtime.spec import Spec, SpecError


def main(spec: Spec, d: Dist) -> int:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    opts = spec.options_as(TeacherLogitsOptions)
    task, block = opts.task, opts.block_size or 0
    records.start(d.world_size)
    tokenizer = models.load_tokenizer(spec)
    teacher.check_tokenizer(spec, tokenizer, task)
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    tutor = teacher.load(spec, d.device, auto, "replicate", task)
    config = tutor.model.config

    raw = data.load_raw(spec)
    meta: dict[str, Any] = {"format": 1, "stage": spec.stage, "task": task}
    if task == "clm":
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and block > limit:
            raise SpecError(f"teacher_logits.block_size: {block} tokens exceed the {limit} positions of the teacher "
                            "(inputs.teacher, n_positions / max_position_embeddings); lower it")
        packed = packing.pack(spec, raw, tokenizer, packing.end_of_document(tokenizer), block)
        splits: dict[str, Any] = {split: p.blocks if p else None for split, p in packed.items()}
        classes, per_example = int(config.vocab_size), block - 1
        meta["block_size"] = block
    else:
        splits = data.tokenize(spec, raw, tokenizer, data.tokenizer_digest(spec))
        classes, per_example = int(config.num_labels), 1
        meta |= {"max_length": spec.data.max_length,
                 "labels": [str(config.id2label.get(i, i)) for i in range(classes)]}
    k = opts.top_k or classes
    if k > classes:
        raise SpecError(f"teacher_logits.top_k: {k}, but the teacher has {classes} classes "
                        f"({'vocab_size' if task == 'clm' else 'num_labels'}); give at most {classes}, or null")
    ends = tokenizer.all_special_ids

    def inputs(ds, indices: list[int]) -> dict[str, Any]:
        if task == "clm":
            return dist.to_device({"input_ids": torch.tensor(ds[indices]["input_ids"])}) | {"use_cache": False}
        return dist.to_device(data.collate(ds, indices, tokenizer.pad_token_id, None, ends))

    def score(ds) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Collective. (values, indices) of every row of `ds`, on every rank; None on a stop request."""
        n = len(ds)
        values, indices = torch.zeros(n * per_example, k), torch.zeros(n * per_example, k, dtype=torch.long)
        for batch in data.eval_shards(n, opts.batch_size, d.world_size, d.rank):
            real = [j for j, i in enumerate(batch) if i >= 0]
            logits = tutor.logits(**inputs(ds, [max(i, 0) for i in batch])).cpu()
            if task == "clm":
                logits = logits[:, :-1]  # position j predicts token j + 1: distill's rows
            top = logits[real].topk(k, dim=-1)  # sorted: largest first
            at = (torch.tensor([batch[j] for j in real], dtype=torch.long)[:, None] * per_example
                  + torch.arange(per_example)).flatten()
            values[at], indices[at] = top.values.reshape(-1, k), top.indices.reshape(-1, k)
            if dist.any_rank(signals.received()):
                return None
        dist.all_reduce_sum(values)
        dist.all_reduce_sum(indices)
        return values, indices

    tensors: dict[str, torch.Tensor] = {}
    for split, ds in splits.items():
        if ds is None:
            continue
        scored = score(ds)
        if scored is None:
            records.log("stop", step=0, reason="signal")
            return EXIT_STOPPED  # nothing written: a rerun scores from the start
        tensors[f"{split}.values"], tensors[f"{split}.indices"] = scored
        if not bool(torch.isfinite(scored[0]).all()):
            raise SpecError(f"inputs.teacher: its logits on the {split} split hold NaN or infinity")

    results: dict[str, float] = {}
    evalset = splits["eval"]
    if evalset is not None:
        if task == "clm":
            truth = torch.tensor(evalset["input_ids"])[:, 1:].flatten()
        else:
            label2id = {name: i for i, name in enumerate(meta["labels"])}
            truth = torch.tensor(label_ids(evalset, spec.data.label_field, label2id, "eval"))
        results["accuracy"] = float((tensors["eval.indices"][:, 0] == truth).double().mean())
        loop.record_eval(spec, 0, results)
    teacher_ref = spec.ref("teacher")
    examples = {split: len(ds) for split, ds in splits.items() if ds is not None}
    meta |= {"top_k": k, "top_k_given": opts.top_k, "classes": classes, "examples": examples,
             "rows": {split: n * per_example for split, n in examples.items()},
             "train_digests": [spec.data.digests[f] for f in spec.data.train_files],
             "eval_digests": [spec.data.digests[f] for f in spec.data.eval_files],
             "hub": spec.data.hub.model_dump() if spec.data.hub else None,
             "teacher": {"source": teacher_ref.source, "stage": teacher_ref.stage, "path": teacher_ref.path,
                         "digest": teacher_ref.digest}}
    dist.print0(f"{spec.stage}: top {k} of {classes} logits for "
                + ", ".join(f"{n} {split} rows" for split, n in meta["rows"].items())
                + "".join(f"; teacher {name} {value:.4f}" for name, value in results.items()))

    def fill(out: Path) -> None:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(out / LOGITS_FILE))
        write_json(out / META_FILE, meta)
        export.save_tokenizer(tokenizer, out)

    path, digest = export.write_folder(spec, fill)
    export.write_result(spec, steps=0, samples=0, output=path, digest=digest, metrics=results)
    return EXIT_DONE


if __name__ == "__main__":
    entry.run(main)
