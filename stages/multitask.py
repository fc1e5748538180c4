"""Multi-task training: one shared encoder, one head per task (sequence classification, masked-LM).

    python -m torch.distributed.run --nproc_per_node N -m stages.multitask --spec spec.json

Each micro-batch belongs to one task, drawn from p_t (weights, or p_t ∝ n_t^(1/T)) by stages/runtime/mixing.py, a
pure function of (seed, global micro-batch index): every rank draws the same task, and a step's gradient is the mean
over ranks of that task's loss; a resumed run draws, samples and masks exactly as an uninterrupted one. The loss of
a micro-batch is its task's loss × loss_weight.

The model: the init model (AutoModelForMaskedLM when a task is mlm, else AutoModel) is the shared encoder; each
classification task is an AutoModelForSequenceClassification whose base-model children that the encoder has
(BERT: embeddings, encoder) are the encoder's, so the rest (BERT: pooler, classifier) is the task's own head.
final/ is the init model's architecture (encoder, with the mlm task's head) + tokenizer; final/tasks/<name>/ is a
complete save_pretrained classifier folder per classification task.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from contract.heads import HEADS
from contract.kinds.multitask import MultitaskOptions, TaskSettings
from contract.layout import EXIT_STOPPED
from stages.runtime import data, entry, heads, lifecycle, mixing, models
from stages.runtime.dist import Dist
from stages.runtime.spec import SpecError, TrainingSpec


def probabilities(opts: MultitaskOptions, sizes: list[int]) -> torch.Tensor:
    """p_t: weights / Σ weights, or n_t^(1/T) normalised (float64)."""
    if opts.mixing == "weights":
        w = torch.tensor([t.weight or 0.0 for t in opts.tasks], dtype=torch.float64)
    else:
        w = torch.tensor(sizes, dtype=torch.float64) ** (1.0 / opts.temperature)
    return w / w.sum()


class MultitaskNet(nn.Module):
    """The shared encoder (`model`, with the mlm head if any) and the classifiers that share its base model; each
    task's rows of logits through its head's module."""

    def __init__(self, model: Any, classifiers: dict[str, Any], mlm_task: str | None,
                 tasks: dict[str, heads.Head]) -> None:
        super().__init__()
        self.model = model
        self.classifiers = nn.ModuleDict(classifiers)
        # the modules hold `model` or a classifier, registered above; only the mlm one under a name of its own
        self.rows = {name: tasks[name].module(c) for name, c in classifiers.items()}
        self.mlm = None
        if mlm_task is not None:
            self.mlm = self.rows[mlm_task] = tasks[mlm_task].module(model)

    def forward(self, task: str, touch: bool = False, **batch: torch.Tensor):
        """The task's rows of logits. With `touch` (training), also a zero that depends on every other head: each
        parameter then gets a gradient (zero) at every micro-step. Without it ZeRO-3 keeps the last gradient of a
        head its micro-step did not use, and a resumed run, whose engine holds none, would part from an unbroken
        one."""
        out = self.rows[task](**batch)
        if not touch:
            return out
        row = {k: v[:1] for k, v in batch.items() if k != "labels"}  # one row: transformers refuses empty batches
        zero = torch.zeros((), device=batch["input_ids"].device)
        for other, rows in self.rows.items():
            if other != task:
                zero = zero + rows(**row).sum() * 0  # no labels: every row of logits
        return out, zero


def classifier(model: Any, labels: list[str | int]) -> Any:
    """An AutoModelForSequenceClassification sharing `model`'s encoder: its base model's children that the
    encoder has are replaced by the encoder's; what is left (BERT: pooler, classifier) is the task's head."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.architectures = None
    config.num_labels = len(labels)
    config.id2label = {i: str(n) for i, n in enumerate(labels)}
    config.label2id = {str(n): i for i, n in enumerate(labels)}
    head = AutoModelForSequenceClassification.from_config(config)
    shared = dict(model.base_model.named_children())
    for name, _ in list(head.base_model.named_children()):
        if name in shared:
            setattr(head.base_model, name, shared[name])
    return head


def main(spec: TrainingSpec, d: Dist) -> int:
    from transformers import AutoModel

    opts = spec.options_as(MultitaskOptions)
    micro = spec.train.micro_batch_size
    tokenizer = models.load_tokenizer(spec)
    digest = data.tokenizer_digest(spec)
    tasks = {t.name: task_head(spec, t, tokenizer, digest) for t in opts.tasks}
    weights = {t.name: t.loss_weight for t in opts.tasks}
    # the task whose head is the shared model's own (its logits over the vocabulary: mlm); the others are classifiers
    mlm_task = next((name for name, h in tasks.items() if h.classes is None), None)
    names = list(tasks)
    sizes = [len(h.splits["train"]) for h in tasks.values()]
    p = probabilities(opts, sizes)
    shares = ", ".join(f"{name} {n} ({float(q):.3f})" for name, n, q in zip(names, sizes, p, strict=True))

    t = lifecycle.start(
        spec, d, num_samples=sum(sizes), what=f"multitask, {len(tasks)} tasks: {shares}",
        build=lambda resume: models.build_model(spec, tasks[mlm_task].auto() if mlm_task else AutoModel, tokenizer,
                                                resume=resume),
        wrap=lambda model: MultitaskNet(model, {name: classifier(model, h.classes) for name, h in tasks.items()
                                                if h.classes is not None}, mlm_task, tasks),
        sampler=mixing.sampler(spec, d, p, sizes, names),
    )

    def micro_step(items: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task's weighted loss, and its own loss as a term: `loss_terms` then holds each task's mean loss."""
        assert isinstance(items, mixing.TaskBatch)
        name = names[items.task]
        head = tasks[name]
        batch = head.batch("train", items)
        rows, zero = t.engine(task=name, touch=True, **batch)
        loss = head.loss(rows, batch) + zero
        return weights[name] * loss, {name: loss}

    def evaluate(step: int) -> dict[str, float]:
        t.engine.eval()
        out: dict[str, float] = {}
        for name, head in tasks.items():
            values = head.evaluate(functools.partial(t.engine, task=name), "eval", micro, d)
            out |= {f"{name}/{k}": v for k, v in values.items()}
        return out

    beside = {f"tasks/{name}": c for name, c in t.engine.module.classifiers.items()}
    if t.fit(micro_step, evaluate, tokenizer, beside=beside):
        return EXIT_STOPPED
    return t.finish(evaluate)


def task_head(spec: TrainingSpec, settings: TaskSettings, tokenizer, tokenizer_digest: str) -> heads.Head:
    """A task's head over its data section, masked (mlm) from a seed of its own."""
    name = settings.name
    if name not in spec.sections:
        raise SpecError(f"sections.{name}: missing (the data of multitask task {name})")
    source = heads.Source(data=spec.sections[name], tokenizer=tokenizer, tokenizer_digest=tokenizer_digest,
                          cache_dir=spec.cache_dir, seed=data.seed_of(spec.seed, "task", name), key=f"sections.{name}",
                          options={k: getattr(settings, k) for k in HEADS[settings.type].options})
    try:
        head = heads.load(settings.type, source)
    except SpecError as e:
        raise SpecError(f"multitask task {name}: {e}") from None
    if len(head.splits["train"]) == 0:
        raise SpecError(f"multitask task {name}: the train split is empty")
    return head


if __name__ == "__main__":
    entry.run_training(main)
