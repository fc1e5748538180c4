"""Knowledge distillation: a student learns from a frozen teacher's logits and the task's labels.

    python -m torch.distributed.run --nproc_per_node N -m stages.distill --spec spec.json

    L = (1 − α) · L_task(y, ŷ_S) + α · T² · KL(softmax(z_T / T) ‖ softmax(z_S / T))

over the rows of logits that count (`rows`): classify one per example, mlm one per masked position (the teacher
reads the same masked input as the student), clm one per predicted token (every position but each block's last).
L_task is the mean cross-entropy over those rows and the KL is their mean ("batchmean": the sum over rows and
classes divided by the number of rows), so α = 0 is the task's own loss and α = 1 pure distillation. Both terms
are logged per step as a `loss_terms` record ({"task", "kd"}). The data are the task's as its own stage reads them
(classify: labels; mlm: stages/runtime/masking.py; clm: stages/runtime/packing.py).

A transfer set (spec.sections["transfer"], text without labels) adds rows whose only target is the teacher: their
loss is the KD term alone, T² · KL (the formula at α = 1), logged as the `transfer` term. Each micro-batch is drawn
from the labelled rows or the transfer set, with probability distill.transfer_share for the latter, by
stages/runtime/mixing.py (a function of (seed, micro-batch), so a resumed run draws as an unbroken one); the head
reads the transfer rows as it reads its own data, without labels (classify: the text column; mlm, clm: the text).

The teacher (stages/runtime/teacher.py) is loaded from its input on every start and stays outside the student's
engine. Offline (input `teacher_logits`, a teacher_logits stage's output) no teacher runs: each row's stored top-k
logits stand for the teacher's, p_T = softmax(values / T) over the k stored classes (the others count as 0), and the
KL takes the student's log-probabilities (over all classes) at the stored ids; with k = all classes it is the online
term. The student is `init`, with only `distill.keep_layers` of its transformer layers when given. Eval: the
task's metrics for the student and `teacher_agreement`, the share of rows where the student's argmax is the
teacher's (classify also `teacher_accuracy`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contract.heads import HEADS
from contract.kinds.distill import DistillOptions
from contract.layout import EXIT_STOPPED
from stages.runtime import curriculum, data, dist, entry, heads, lifecycle, mixing, models, packing, pruning, teacher
from stages.runtime.dist import Dist
from stages.runtime.masking import EVAL_EPOCH
from stages.runtime.spec import TrainingSpec

# The teacher's side of a batch's rows: its logits (rows, classes), or stored top-k (values, class ids), each (rows, k)
Taught = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def distill_loss(student_logits: torch.Tensor, teacher: Taught, task_loss: torch.Tensor, alpha: float,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, KL) for (rows, classes) student logits: L = (1 − α) · task_loss + α · T² · KL(p_T ‖ p_S), p = softmax(z / T),
    the KL summed over classes and averaged over rows. Computed in float32.

    `teacher` is its logits, or its top-k (values, indices): then p_T = softmax(values / T) over the k stored classes
    (renormalised; the others count as 0) and the KL is Σ_{i ∈ top-k} p_T,i (log p_T,i − log p_S,i), with log p_S
    over all classes taken at the stored ids; with k = all classes that is the full KL."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    if isinstance(teacher, tuple):
        values, indices = teacher
        log_s, teacher = log_s.gather(-1, indices), values
    kd = F.kl_div(log_s, F.log_softmax(teacher.float() / t, dim=-1), log_target=True, reduction="batchmean")
    return (1 - alpha) * task_loss + alpha * t * t * kd, kd


def main(spec: TrainingSpec, d: Dist) -> int:
    opts = spec.options_as(DistillOptions)
    micro = spec.train.micro_batch_size
    if opts.block_size is not None:
        packing.check_block_size(spec, opts.block_size, "distill.block_size")
    tokenizer = models.load_tokenizer(spec)
    offline = "teacher_logits" in spec.inputs  # the stored logits of a teacher_logits stage; no teacher runs
    teacher.check_tokenizer(spec, tokenizer, opts.task, "teacher_logits" if offline else "teacher")
    # The task's data, and a batch of it as the student and the teacher read it (the teacher sees the same masks).
    head = heads.of(spec, opts.task, tokenizer, **opts.head_options())
    tutor = None if offline else teacher.load(spec, d.device, head.auto(), opts.teacher_placement, opts.task)
    train, evalset = head.splits["train"], head.splits["eval"]
    # The teacher's side of each batch: the teacher itself, or the logits it stored
    source: teacher.Teacher | teacher.Stored = tutor if tutor is not None else teacher.load_stored(
        spec, opts.task, block_size=opts.block_size, device=d.device,
        examples={"train": len(train), "eval": len(evalset) if evalset is not None else None})
    source.check_labels(head.classes)
    # The rows each micro-batch may be drawn from: the labelled ones, and the transfer set's (no labels)
    reads = {"data": head}
    if opts.transfer_share is not None:
        reads["transfer"] = heads.unlabelled(spec, "transfer", opts.task, tokenizer, head.classes,
                                             **opts.head_options())
    names, sizes = list(reads), [len(h.splits["train"]) for h in reads.values()]

    def build(resume: bool) -> nn.Module:
        model = models.build_model(spec, head.auto(), tokenizer, resume=resume,
                                   **head.model_args(spec.ref("init").source == "config"))
        if opts.keep_layers is not None:
            kept = pruning.keep_layers(model, opts.keep_layers, "distill.keep_layers")
            if not resume:
                dist.print0(f"{spec.stage}: the student keeps layers {kept} of inputs.init")
        source.check_logits(model, opts.task)
        return model

    what = (f"distill ({opts.task}, α {opts.alpha}, T {opts.temperature}, {source.describe()}), "
            f"{len(train)} train samples")
    mixed = None  # the plain stream (or the curriculum's) of the labelled rows
    if opts.transfer_share is not None:
        what += f", {sizes[1]} transfer samples at share {opts.transfer_share}"
        p = torch.tensor([1 - opts.transfer_share, opts.transfer_share], dtype=torch.float64)
        mixed = mixing.sampler(spec, d, p, sizes, names)
    t = lifecycle.start(spec, d, num_samples=sum(sizes), what=what, build=build, wrap=head.module,
                        difficulty=curriculum.difficulty(spec, train), sampler=mixed)
    dist.print0(f"{spec.stage}: the student has {models.parameter_count(t.model):,} parameters")

    def taught_of(split: str, keys: list[tuple[int, int]], batch: dict[str, torch.Tensor],
                  rows: heads.Head = head) -> Taught | None:
        """The teacher's side of the batch's rows (read by `rows`): its logits, or the stored top-k (None: no stored
        eval rows)."""
        if isinstance(source, teacher.Teacher):
            return rows.select(source.logits(**_inputs(batch)), batch)
        if not source.has(split):
            return None
        return source.rows(split, [i for i, _ in keys if i >= 0], batch["input_ids"].shape[1])

    def micro_step(keys: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        drawn = names[keys.task] if isinstance(keys, mixing.TaskBatch) else "data"
        rows = reads[drawn]
        batch = rows.batch("train", keys, t.sampler.max_length)
        taught = taught_of("train", keys, batch, rows)
        assert taught is not None, "load_stored checked the training rows"
        student = t.engine(**batch)
        if drawn == "transfer":  # no labels: the teacher's logits are the only target (the loss at α = 1)
            loss, kd = distill_loss(student, taught, student.new_zeros(()), 1.0, opts.temperature)
            return loss, {"transfer": kd.detach()}
        task_loss = head.loss(student, batch)
        loss, kd = distill_loss(student, taught, task_loss, opts.alpha, opts.temperature)
        return loss, {"task": task_loss.detach(), "kd": kd.detach()}

    def evaluate(step: int) -> dict[str, float]:
        """The head's metrics of the student; where the teacher's eval rows are known, the share of rows where its
        top-1 is the student's (teacher_agreement) and, for a classifier, the label (teacher_accuracy)."""
        if evalset is None:
            return {}
        t.engine.eval()
        total: torch.Tensor | None = None
        agreement = torch.zeros(3, dtype=torch.float64)  # rows, rows where student = teacher, teacher right
        with torch.no_grad():
            for indices in data.eval_shards(len(evalset), micro, d.world_size, d.rank):
                keys = [(i, EVAL_EPOCH) for i in indices]
                batch = head.batch("eval", keys)
                student = t.engine(**batch)
                sums = head.sums(student, batch)
                total = sums if total is None else total + sums
                taught = taught_of("eval", keys, batch)
                if taught is not None:  # the teacher's top-1 (stored: the first of the top-k)
                    said = (taught[1][:, 0] if isinstance(taught, tuple) else taught.argmax(-1)).cpu()
                    y = head.targets(batch).cpu()
                    agreement += torch.tensor([len(y), float((student.argmax(-1).cpu() == said).sum()),
                                               float((said == y).sum())], dtype=torch.float64)
        assert total is not None, "every rank has at least one eval batch"
        scores = head.metrics_of(total)
        if not source.has("eval"):
            return scores
        dist.all_reduce_sum(agreement)
        n = float(agreement[0])
        return scores | {"teacher_agreement": float(agreement[1]) / n} | (
            {"teacher_accuracy": float(agreement[2]) / n} if HEADS[opts.task].classes == "num_labels" else {})

    if t.fit(micro_step, evaluate, tokenizer, head=head):
        return EXIT_STOPPED
    return t.finish(evaluate)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the teacher's forward takes of a batch: the model inputs, not the labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


if __name__ == "__main__":
    entry.run_training(main)
