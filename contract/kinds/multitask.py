"""`multitask`: one shared encoder, one head per task (sequence classification, masked-LM), each task with its own
data and eval; micro-batches are mixed across tasks by weights or by temperature sampling."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from contract.heads import HEADS
from contract.sections import Data, DataSection, Problem, Strict, TrainingStage, finite_number

TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class TaskSettings(Strict):
    """A task as the stage reads it (spec.options.tasks[]): everything but its data, which is spec.sections[name]."""

    name: str = Field(pattern=TASK_NAME, max_length=64, description="Unique task name: letters, digits, _ and -; "
                      "it names the task's metrics (<name>/accuracy …) and its folder final/tasks/<name>/.")
    type: Literal["classify", "mlm"] = Field(description="classify: sequence classification (a head as "
                                             "AutoModelForSequenceClassification's); mlm: masked-LM (the head of "
                                             "AutoModelForMaskedLM; at most one such task).")
    weight: float | None = Field(None, ge=0, description="mixing: weights: the share of micro-batches drawn for "
                                 "this task is weight / Σ weights (≥ 0; their sum > 0). Not used with temperature.")
    loss_weight: float = Field(1.0, ge=0, description="The task's loss is multiplied by this (≥ 0).")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="mlm: share of tokens masked (80% [MASK], 10% random, "
                             "10% kept).")

    @field_validator("weight", "loss_weight", "mask_prob", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        return finite_number(value)


class Task(TaskSettings):
    """A task in the manifest: its settings and its data."""

    data: Data = Field(description="The task's data, as a stage's data: section (classify: text_field, "
                       "label_field, labels; mlm: text).")


class Mixing(Strict):
    mixing: Literal["weights", "temperature"] = Field(
        "temperature", description="How each micro-batch's task is drawn: weights (p_t ∝ tasks[].weight) or "
        "temperature (p_t ∝ n_t^(1/T), n_t the task's training examples: T = 1 proportional, larger T flatter).")
    temperature: float = Field(1.0, gt=0, description="T of mixing: temperature (> 0).")

    @field_validator("temperature", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        return finite_number(value)


class MultitaskOptions(Mixing):
    """spec.options: the mixing and the tasks without their data."""

    tasks: list[TaskSettings]


class MultitaskSection(Mixing):
    """The manifest's `multitask:` section."""

    tasks: list[Task] = Field(min_length=1, max_length=64, description="The tasks, each with its head and data.")

    @model_validator(mode="after")
    def _tasks(self) -> MultitaskSection:
        seen: set[str] = set()
        for j, task in enumerate(self.tasks):
            if task.name in seen:
                raise Problem(("tasks", j, "name"), f"duplicate task name '{task.name}'")
            seen.add(task.name)
            if task.type == "mlm" and any(t.type == "mlm" for t in self.tasks[:j]):
                raise Problem(("tasks", j, "type"), "at most one mlm task: the encoder has one masked-LM head")
            if task.type == "mlm" and task.data.labels is not None:
                raise Problem(("tasks", j, "data", "labels"), "an mlm task has no labels")
            if self.mixing == "weights" and task.weight is None:
                raise Problem(("tasks", j), "weight is missing: mixing: weights needs one per task")
            if self.mixing == "temperature" and task.weight is not None:
                raise Problem(("tasks", j, "weight"), "weight is for mixing: weights; with mixing: temperature the "
                              "shares come from the tasks' sizes")
        if self.mixing == "weights" and not sum(t.weight or 0 for t in self.tasks) > 0:
            raise Problem(("tasks",), "the tasks' weights sum to 0; at least one must be > 0")
        return self

    def options(self) -> dict[str, Any]:
        """spec.options: the data of each task goes to spec.sections (its files count there by digest)."""
        return self.model_dump(exclude={"tasks": {j: {"data"} for j in range(len(self.tasks))}})


class MultitaskStage(TrainingStage):
    options_field: ClassVar[str | None] = "multitask"

    kind: Literal["multitask"] = Field(description="Multi-task training: a shared encoder, one head per task, "
                                       "micro-batches mixed across tasks; eval: each task's metrics.")
    data: Data | None = Field(  # type: ignore[assignment]  # each task has its own data instead
        None, description="Not used: each task has its own (multitask.tasks[].data).")
    multitask: MultitaskSection = Field(description="The tasks and how they are mixed.")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key, why in (("data", "each task has its own: multitask.tasks[].data"),
                             ("curriculum", "a curriculum is not supported by multitask")):
                if values.get(key) is not None:
                    raise Problem((key,), why)
        return values

    @model_validator(mode="after")
    def _length(self) -> MultitaskStage:
        if self.train.max_steps is None:
            raise Problem(("train", "epochs"), "multitask needs train.max_steps: an epoch differs from task to task")
        return self

    def options(self) -> dict[str, Any]:
        return self.multitask.options()

    def metric_names(self) -> frozenset[str]:
        return frozenset(f"{t.name}/{m}" for t in self.multitask.tasks if t.data.eval is not None
                         or t.data.eval_split is not None for m in HEADS[t.type].metrics)

    def data_sections(self) -> list[DataSection]:
        return [DataSection(t.name, ("multitask", "tasks", j, "data"), t.data, t.type)
                for j, t in enumerate(self.multitask.tasks)]


STAGE = MultitaskStage
