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

import os
from pathlib import Path
from typing import Any

import torch

from contract.files import write_json
from contract.heads import HEADS
from contract.kinds.teacher_logits import LOGITS_FILE, META_FILE, TeacherLogitsOptions
from contract.layout import EXIT_DONE, EXIT_STOPPED
from stages.runtime import data, dist, entry, export, heads, loop, models, packing, records, signals, teacher
from stages.runtime.dist import Dist
from stages.runtime.masking import EVAL_EPOCH
from stages.runtime.spec import Spec, SpecError


def main(spec: Spec, d: Dist) -> int:
    from safetensors.torch import save_file

    opts = spec.options_as(TeacherLogitsOptions)
    task = opts.task
    records.start(d.world_size)
    tokenizer = models.load_tokenizer(spec)
    teacher.check_tokenizer(spec, tokenizer, task)
    head_options = {k: v for k, v in spec.options.items() if k in HEADS[task].options}
    if "block_size" in head_options:
        packing.check_block_size(spec, head_options["block_size"], "teacher_logits.block_size", name="teacher")
    tutor = teacher.load(spec, d.device, heads.auto(task), "replicate", task)
    config = tutor.model.config
    classes = int(getattr(config, HEADS[task].classes))
    # the rows are the teacher's: a classifier's labels are read through its own label2id
    head = heads.of(spec, task, tokenizer, labels=heads.model_labels(task, tutor.model), **head_options)
    splits = {split: ds for split, ds in head.splits.items() if ds is not None}
    meta: dict[str, Any] = {"format": 1, "stage": spec.stage, "task": task}
    # what cut the examples into rows: packing's block_size, else data.max_length
    meta |= {"block_size": head_options["block_size"]} if "block_size" in head_options else {
        "max_length": spec.data.max_length}
    if head.classes is not None:
        meta["labels"] = head.classes
    k = opts.top_k or classes
    if k > classes:
        raise SpecError(f"teacher_logits.top_k: {k}, but the teacher has {classes} classes "
                        f"({HEADS[task].classes}); give at most {classes}, or null")

    def score(split: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Collective. (values, indices, rows per example) of every row of `split`, on every rank; None on a stop
        request. Every example has as many rows (one, or a block's predicted tokens)."""
        n = len(splits[split])
        per_example = len(head.targets(head.batch(split, [(0, EVAL_EPOCH)])))  # as every example of a storable head
        values, indices = torch.zeros(n * per_example, k), torch.zeros(n * per_example, k, dtype=torch.long)
        for batch_indices in data.eval_shards(n, opts.batch_size, d.world_size, d.rank):
            batch = head.batch(split, [(i, EVAL_EPOCH) for i in batch_indices])
            rows = head.select(tutor.logits(**{k: v for k, v in batch.items() if k != "labels"}), batch).cpu()
            examples = torch.tensor([i for i in batch_indices if i >= 0], dtype=torch.long)
            top = rows.topk(k, dim=-1)  # sorted: largest first
            at = (examples[:, None] * per_example + torch.arange(per_example)).flatten()
            values[at], indices[at] = top.values, top.indices
            if dist.any_rank(signals.received()):
                return None
        dist.all_reduce_sum(values)
        dist.all_reduce_sum(indices)
        return values, indices, per_example

    tensors: dict[str, torch.Tensor] = {}
    rows_per_example = {}
    for split in splits:
        scored = score(split)
        if scored is None:
            records.log("stop", step=0, reason="signal")
            return EXIT_STOPPED  # nothing written: a rerun scores from the start
        tensors[f"{split}.values"], tensors[f"{split}.indices"], rows_per_example[split] = scored
        if not bool(torch.isfinite(scored[0]).all()):
            raise SpecError(f"inputs.teacher: its logits on the {split} split hold NaN or infinity")

    results: dict[str, float] = {}
    if "eval" in splits:
        truth = torch.cat([head.targets(batch).cpu() for batch in _all(head, "eval", opts.batch_size)])
        results["accuracy"] = float((tensors["eval.indices"][:, 0] == truth).double().mean())
        loop.record_eval(spec, 0, results)
    teacher_ref = spec.ref("teacher")
    examples = {split: len(ds) for split, ds in splits.items()}
    meta |= {"top_k": k, "top_k_given": opts.top_k, "classes": classes, "examples": examples,
             "rows": {split: n * rows_per_example[split] for split, n in examples.items()},
             "train_digests": [spec.data.digests[f] for f in spec.data.train_files],
             "eval_digests": [spec.data.digests[f] for f in spec.data.eval_files],
             "hub": spec.data.hub.model_dump() if spec.data.hub else None,
             # the teacher by what it is (its stage, its digest; a hub name), never where it lay: an absolute path
             # here would give the same logits another digest in another run folder
             "teacher": {"source": teacher_ref.source, "stage": teacher_ref.stage,
                         "path": None if teacher_ref.path is None or os.path.isabs(teacher_ref.path)
                         else teacher_ref.path, "digest": teacher_ref.digest}}
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


def _all(head: heads.Head, split: str, batch_size: int):
    """Every batch of `split` in example order, on this rank alone."""
    n = len(head.splits[split])
    for start in range(0, n, batch_size):
        yield head.batch(split, [(i, EVAL_EPOCH) for i in range(start, min(start + batch_size, n))])


if __name__ == "__main__":
    entry.run(main)
