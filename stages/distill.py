"""Knowledge distillation: a student learns from a frozen teacher's logits and the task's labels.

    python -m torch.distributed.run --nproc_per_node N -m stages.distill --spec spec.json

    L = (1 − α) · L_task(y, ŷ_S) + α · T² · KL(softmax(z_T / T) ‖ softmax(z_S / T))

over the rows of logits that count (`rows`): classify one per example, mlm one per masked position (the teacher
reads the same masked input as the student), clm one per predicted token (every position but each block's last).
L_task is the mean cross-entropy over those rows and the KL is their mean ("batchmean": the sum over rows and
classes divided by the number of rows), so α = 0 is the task's own loss and α = 1 pure distillation. Both terms
are logged per step as a `loss_terms` record ({"task", "kd"}). The data are the task's as its own stage reads them
(classify: labels; mlm: stages/runtime/masking.py; clm: stages/runtime/packing.py).

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

from contract.kinds.distill import DistillOptions
from contract.layout import EXIT_STOPPED
from stages.runtime import curriculum, data, dist, entry, evaluation, lifecycle, models, packing, pruning, teacher
from stages.runtime.dist import Dist
from stages.runtime.labels import label_ids, label_names
from stages.runtime.masking import EVAL_EPOCH, Masker
from stages.runtime.metrics import language_model_metrics
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


def rows(task: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits that count, as (rows, classes): classify all, mlm the masked positions, clm all but the last."""
    if task == "mlm":
        return logits[batch["labels"] != -100]
    if task == "clm":
        return logits[:, :-1].flatten(0, 1)
    return logits


def targets(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The label of each row of `rows`."""
    if task == "mlm":
        return batch["labels"][batch["labels"] != -100]
    if task == "clm":
        return batch["input_ids"][:, 1:].flatten()
    return batch["labels"]


class Student(nn.Module):
    """The student's rows of logits for a batch (its `labels` select mlm's rows; the model never sees them).
    For mlm the vocabulary projection runs on the masked positions alone, as in MaskedLMLoss."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model: Any = model
        self.task = task
        heads = [name for name, _ in model.named_children() if name != self.model.base_model_prefix]
        self.head = heads[0] if task == "mlm" and len(heads) == 1 else None

    def forward(self, labels: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        batch = {**inputs, "labels": labels} if labels is not None else inputs
        if self.head is not None:
            hidden = self.model.base_model(**inputs)[0]
            return getattr(self.model, self.head)(hidden[labels != -100])
        extra = {"use_cache": False} if self.task == "clm" else {}
        return rows(self.task, self.model(**inputs, **extra).logits, batch)


def main(spec: TrainingSpec, d: Dist) -> int:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    opts = spec.options_as(DistillOptions)
    task, micro = opts.task, spec.train.micro_batch_size
    auto = {"classify": AutoModelForSequenceClassification, "mlm": AutoModelForMaskedLM,
            "clm": AutoModelForCausalLM}[task]
    if task == "clm":
        packing.check_block_size(spec, opts.block_size or 0, "distill.block_size")
    tokenizer = models.load_tokenizer(spec)
    offline = "teacher_logits" in spec.inputs  # the stored logits of a teacher_logits stage; no teacher runs
    teacher.check_tokenizer(spec, tokenizer, task, "teacher_logits" if offline else "teacher")
    tutor = None if offline else teacher.load(spec, d.device, auto, opts.teacher_placement, task)

    # The task's data: each split's examples, and a batch of them as the student and the teacher read it.
    build_extra: dict[str, Any] = {}
    names: list[str | int] = []
    labels: dict[str, Any] = {}  # classify: each split's label ids
    raw = data.load_raw(spec)
    if task == "clm":
        eos = packing.end_of_document(tokenizer)
        packed = packing.pack(spec, raw, tokenizer, eos, opts.block_size or 0)
        splits: dict[str, Any] = {split: p.blocks if p else None for split, p in packed.items()}
        build_extra = {"eos_token_id": eos} if spec.ref("init").source == "config" else {}
    else:
        splits = data.tokenize(spec, raw, tokenizer, data.tokenizer_digest(spec))
    train, evalset = splits["train"], splits["eval"]
    # The teacher's side of each batch: the teacher itself, or the logits it stored
    source: teacher.Teacher | teacher.Stored = tutor if tutor is not None else teacher.load_stored(
        spec, task, block_size=opts.block_size, device=d.device,
        examples={"train": len(train), "eval": len(evalset) if evalset is not None else None})
    if task == "classify":
        names = label_names(spec, raw)
        source.check_labels(names)
        label2id = {str(name): i for i, name in enumerate(names)}
        build_extra = {"num_labels": len(names), "id2label": {i: str(n) for i, n in enumerate(names)},
                       "label2id": label2id}
        labels = {split: torch.tensor(label_ids(ds, spec.data.label_field, label2id, split)) if ds else None
                  for split, ds in splits.items()}
    masker = Masker(tokenizer, opts.mask_prob or 0.15, spec.seed) if task == "mlm" else None
    ends = tokenizer.all_special_ids

    def batch_of(split: str, keys: list[tuple[int, int]], max_length: int | None = None) -> dict[str, torch.Tensor]:
        ds, indices = splits[split], [i for i, _ in keys]
        if task == "clm":
            return dist.to_device({"input_ids": torch.tensor(ds[indices]["input_ids"])[:, :max_length]})
        batch = data.collate(ds, indices, tokenizer.pad_token_id, max_length, ends)
        if masker is not None:
            masker(batch, keys)
        else:
            batch["labels"] = labels[split][indices]
        return dist.to_device(batch)

    def build(resume: bool) -> nn.Module:
        model = models.build_model(spec, auto, tokenizer, resume=resume, **build_extra)
        if opts.keep_layers is not None:
            kept = pruning.keep_layers(model, opts.keep_layers, "distill.keep_layers")
            if not resume:
                dist.print0(f"{spec.stage}: the student keeps layers {kept} of inputs.init")
        source.check_logits(model, task)
        return model

    what = f"distill ({task}, α {opts.alpha}, T {opts.temperature}, {source.describe()}), {len(train)} train samples"
    t = lifecycle.start(spec, d, num_samples=len(train), what=what, build=build,
                        wrap=lambda model: Student(model, task),
                        difficulty=curriculum.difficulty(spec, train) if task != "clm" else None)
    dist.print0(f"{spec.stage}: the student has {models.parameter_count(t.model):,} parameters")

    def taught_of(split: str, keys: list[tuple[int, int]], batch: dict[str, torch.Tensor]) -> Taught | None:
        """The teacher's side of the batch's rows: its logits, or the stored top-k (None: no stored eval rows)."""
        if isinstance(source, teacher.Teacher):
            return rows(task, source.logits(**_inputs(task, batch)), batch)
        if not source.has(split):
            return None
        return source.rows(split, [i for i, _ in keys], batch["input_ids"].shape[1] if task == "clm" else None)

    def micro_step(keys: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = batch_of("train", keys, t.sampler.max_length)
        taught = taught_of("train", keys, batch)
        assert taught is not None, "load_stored checked the training rows"
        student = t.engine(**batch)
        task_loss = F.cross_entropy(student.float(), targets(task, batch))
        loss, kd = distill_loss(student, taught, task_loss, opts.alpha, opts.temperature)
        return loss, {"task": task_loss.detach(), "kd": kd.detach()}

    def evaluate(step: int) -> dict[str, float]:
        if evalset is None:
            return {}
        t.engine.eval()
        total = torch.zeros(4, dtype=torch.float64)  # loss sum, rows, rows where student = teacher, teacher right
        mine: list[tuple[torch.Tensor, torch.Tensor]] = []  # classify: this rank's (logits, labels) of real rows
        with torch.no_grad():
            for indices in data.eval_shards(len(evalset), micro, d.world_size, d.rank):
                # Padding rows (index -1) run with zero weight: ZeRO-3 needs equal forward counts on every rank.
                real = torch.tensor(indices) >= 0
                keys = [(max(i, 0), EVAL_EPOCH) for i in indices]
                batch = batch_of("eval", keys)
                if task == "mlm":
                    batch["labels"][real.logical_not().to(batch["labels"].device)] = -100
                student = t.engine(**batch).float().cpu()
                taught = taught_of("eval", keys, batch)
                y = targets(task, batch).cpu()
                weight = {"classify": real, "mlm": torch.ones(len(y), dtype=torch.bool),
                          "clm": real.repeat_interleave(batch["input_ids"].shape[1] - 1)}[task].double()
                pred = student.argmax(-1)
                # the teacher's top-1 (stored: the first of the top-k); -1 where no stored eval rows: matches nothing
                said = (taught[1][:, 0] if isinstance(taught, tuple) else taught.argmax(-1)).cpu() \
                    if taught is not None else torch.full_like(y, -1)
                total += torch.stack([F.cross_entropy(student, y, reduction="none").double() @ weight, weight.sum(),
                                      (pred == said).double() @ weight, (said == y).double() @ weight])
                if task == "classify":
                    mine.append((student[real], y[real]))
        taught_eval = source.has("eval")
        if task != "classify":
            lm = language_model_metrics(total[:2].clone())  # eval_loss, perplexity: summed over the ranks there
            dist.all_reduce_sum(total)
            return lm | ({"teacher_agreement": float(total[2] / total[1])} if taught_eval else {})
        scores = evaluation.classification_metrics(torch.cat([x for x, _ in mine]), torch.cat([y for _, y in mine]),
                                                   len(names))
        dist.all_reduce_sum(total)
        n = float(total[1])
        return scores | ({"teacher_agreement": float(total[2]) / n, "teacher_accuracy": float(total[3]) / n}
                         if taught_eval else {})

    if t.fit(micro_step, evaluate):
        return EXIT_STOPPED
    return t.finish(evaluate, tokenizer, task=task, mask_prob=opts.mask_prob or 0.15)


def _inputs(task: str, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the teacher's forward takes of a batch: the model inputs, not the labels."""
    return {k: v for k, v in batch.items() if k != "labels"} | ({"use_cache": False} if task == "clm" else {})


if __name__ == "__main__":
    entry.run_training(main)
