"""`distill`: online knowledge distillation. A frozen teacher's logits train a student alongside the task's labels:

    L = (1 − alpha) · L_task(y, ŷ_S) + alpha · T² · KL(softmax(z_T / T) ‖ softmax(z_S / T))

for sequence classification (one row of logits per example), masked-LM (the masked positions) or causal-LM (every
predicted token). The student is `init` (optionally with only some of its transformer layers kept: DistilBERT's
student is its teacher with every other layer); the teacher is `teacher`, an earlier stage's output or a folder, run
at every step (online), or `teacher_logits`, the top-k logits a `teacher_logits` stage stored for every training row
(offline: no teacher runs). A `transfer` set, text without labels, adds rows whose only target is the teacher's
softened logits (L = T² · KL on them), mixed with the labelled rows at distill.transfer_share of the micro-batches.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from contract import heads
from contract.sections import (
    BLOCK_SIZE,
    Data,
    DataSection,
    Head,
    ModelRef,
    Problem,
    RowsRef,
    Strict,
    TrainingStage,
    TransferData,
    finite_number,
)


class DistillOptions(Strict):
    """The manifest's `distill:` section; as spec.options it holds only what its task uses."""

    task: Annotated[str, AfterValidator(heads.check)] = Field(
        json_schema_extra={"enum": heads.names()},
        description="The student's (and teacher's) head and task loss: classify (sequence classification, "
        "data.label_field / data.labels), mlm (masked-LM at mask_prob), clm (next-token prediction on blocks of "
        "block_size tokens).")
    alpha: float = Field(0.5, ge=0, le=1, description="λ in [0, 1]: the distillation term's weight; 0 is the task "
                         "loss alone, 1 the distillation loss alone.")
    temperature: float = Field(2.0, gt=0, description="T > 0: both logit sets are divided by T before the softmax; "
                               "the distillation term is scaled by T² so its gradients keep their size.")
    teacher_placement: Literal["replicate", "zero3", "cpu"] = Field(
        "replicate", description="Where the frozen teacher lives: replicate (a full copy on every rank), zero3 "
        "(partitioned across the ranks by a DeepSpeed ZeRO-3 engine without optimizer, forward only: a teacher "
        "larger than one device fits), cpu (kept on the CPU, its logits moved to the student's device; on a CPU-only "
        "machine the same as replicate).")
    transfer_share: float | None = Field(
        None, gt=0, le=1, description="With a transfer set: the share of micro-batches drawn from it, in (0, 1] (1: "
        "the transfer set alone); the others are the labelled rows of data.train. Each micro-batch's source is a "
        "function of (seed, micro-batch), so a resumed run draws as an unbroken one.")
    keep_layers: Literal["every_other"] | list[int] | None = Field(
        None, description="The student is `init` with only these transformer layers kept (0-based, in order): a list "
        "of indices, or every_other (0, 2, 4 …; DistilBERT's student when init is the teacher). Null: all. "
        "BERT-like (encoder.layer) and GPT-2-like (transformer.h) models.")
    mask_prob: float | None = Field(None, gt=0, lt=1, description="task mlm: share of tokens masked (80% [MASK], "
                                    "10% random, 10% kept); default 0.15.")
    block_size: int | None = Field(None, ge=8, le=1_048_576, strict=True, description="task clm: tokens per "
                                   f"training block (as clm.block_size); default {BLOCK_SIZE}.")

    head: dict[str, Any] = Field(
        default_factory=dict, description="The task's own settings, for a head that has a section of its own: task "
        "sft takes an sft stage's `sft:` section here (prompt_field, completion_field or messages_field, template, "
        "label_set …). Default: that head's defaults.")

    @field_validator("alpha", "temperature", "mask_prob", "transfer_share", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        return finite_number(value)

    @field_validator("keep_layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("an empty list keeps no layer; name at least one, or leave keep_layers out")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"{value!r}: layer indices (integers) are expected")
        if any(v < 0 for v in value):
            raise ValueError(f"{value!r}: layer indices are 0 or more")
        if len(set(value)) != len(value):
            raise ValueError(f"{value!r}: an index repeats")
        if value != sorted(value):
            raise ValueError(f"{value!r}: give the indices in increasing order (the student keeps the layers' order)")
        return value

    @model_validator(mode="after")
    def _task_settings(self) -> DistillOptions:
        for name, why in heads.option_problems(self.task, self._head_given()):
            raise Problem((name,), why)
        if self.head and heads.HEADS[self.task].settings is None:
            raise Problem(("head",), f"task {self.task} has no settings of its own; leave head out")
        try:
            self.head_settings()
        except ValidationError as e:  # its model's first error, under distill.head
            error = e.errors()[0]
            raise Problem(("head", *error["loc"]), error["msg"].removeprefix("Value error, ")) from None
        return self

    def head_settings(self) -> Any:
        """The task's own section (its head's settings model), or None for a head without one."""
        model = heads.HEADS[self.task].settings
        return None if model is None else model.model_validate(self.head)

    def _head_given(self) -> dict[str, Any]:
        return {"mask_prob": self.mask_prob, "block_size": self.block_size}

    def settings(self) -> dict[str, Any]:
        """spec.options: the task's defaults filled in, the other tasks' settings left out (`head` where the task's
        head has a section of its own)."""
        own = self.head_settings()
        # transfer_share only where given: a stage without a transfer set keeps the fingerprint it had before
        unset = {"transfer_share"} if self.transfer_share is None else set()
        return self.model_dump(exclude={*self._head_given(), "head", *unset}) \
            | heads.settings(self.task, self._head_given()) \
            | ({"head": own.model_dump()} if own is not None else {})

    def head_options(self) -> dict[str, Any]:
        """What the task's head reads (contract.heads): its options with their defaults, and its own section."""
        own = self.head_settings()
        return heads.settings(self.task, self._head_given()) | (own.model_dump() if own is not None else {})


class TeacherLogitsRef(RowsRef):
    """An earlier teacher_logits stage's stored logits (its final/), per row of this stage's training data."""

    needs: ClassVar[str] = "teacher_logits"
    holds: ClassVar[str] = "logits"
    same_rows: ClassVar[bool] = True


class DistillStage(TrainingStage):
    options_field: ClassVar[str | None] = "distill"
    unlabelled_rows: ClassVar[str | None] = ("rows without labels go in transfer: (the teacher's logits are "
                                             "their only targets)")
    same_vocabulary: ClassVar[tuple[tuple[str, str], ...]] = (("init", "tokenizer"), ("teacher", "tokenizer"))

    kind: Literal["distill"] = Field(description="Knowledge distillation: a student learns from a frozen teacher's "
                                     "logits and the task's labels; eval: the task's metrics and teacher_agreement.")
    teacher: ModelRef | None = Field(None, description="The frozen teacher, run at every step: an earlier stage "
                                     "(from) or a trained model folder / hub name (pretrained), with the head of "
                                     "distill.task. Its tokenizer must be the student's. Or give teacher_logits.")
    teacher_logits: TeacherLogitsRef | None = Field(
        None, description="Offline distillation: the top-k logits an earlier teacher_logits stage (from) stored for "
        "this stage's training data (the same files, task and block_size), used instead of running a teacher.")
    transfer: TransferData | None = Field(
        None, description="A transfer set: training rows without labels (any text source: .txt, or JSON/CSV/Parquet "
        "with text_field, or hub), trained on the teacher's softened logits alone (T² · KL), drawn for "
        "distill.transfer_share of the micro-batches. Needs teacher (online) and train.max_steps. Default: none.")
    distill: DistillOptions = Field(description="Task, λ, temperature, teacher placement, student layers, the "
                                    "transfer set's share.")

    @model_validator(mode="after")
    def _teacher(self) -> DistillStage:
        if self.teacher is None and self.teacher_logits is None:
            raise Problem(("teacher",), "required: give teacher (a model, run at every step) or teacher_logits "
                          "(from: an earlier teacher_logits stage, its stored logits)")
        if self.teacher is not None and self.teacher_logits is not None:
            raise Problem(("teacher_logits",), "give teacher or teacher_logits, not both: teacher_logits replace "
                          "running a teacher with its stored logits")
        if self.teacher_logits is not None:
            if not heads.HEADS[self.distill.task].storable:
                raise Problem(("teacher_logits",), f"distill.task {self.distill.task} cannot read stored logits: its "
                              "rows change every epoch (masks); give teacher (online) instead")
            if "teacher_placement" in self.distill.model_fields_set:
                raise Problem(("distill", "teacher_placement"), "with teacher_logits no teacher runs: leave out "
                              "teacher_placement")
        elif self.teacher is not None and self.teacher.config is not None:
            raise Problem(("teacher", "config"), "a teacher built from a config is untrained and teaches nothing; "
                          "give teacher.from (an earlier stage) or teacher.pretrained (a trained model)")
        return self

    @model_validator(mode="after")
    def _transfer(self) -> DistillStage:
        share = self.distill.transfer_share
        if self.transfer is None:
            if share is not None:
                raise Problem(("distill", "transfer_share"), "no transfer set to draw from: give transfer (text "
                              "without labels) or leave out transfer_share")
            return self
        task = self.distill.task
        for wrong, key, why in (
                (share is None, ("distill", "transfer_share"), "required with transfer: the share of micro-batches "
                 "drawn from the transfer set, in (0, 1]"),
                (not heads.HEADS[task].unlabelled, ("transfer",), f"task {task} cannot read rows without labels: "
                 "its rows are a completion's tokens, which text alone does not have"),
                (self.teacher_logits is not None, ("transfer",), "the stored teacher_logits cover data.train only, "
                 "not the transfer rows: give teacher (run at every step) instead of teacher_logits"),
                (self.curriculum is not None, ("curriculum",), "a curriculum orders data.train alone; with transfer "
                 "the micro-batches are mixed from two sets: leave out curriculum"),
                (self.train.max_steps is None, ("train", "epochs"), "with transfer give train.max_steps: an epoch "
                 "of the labelled rows and one of the transfer set differ")):
            if wrong:
                raise Problem(key, why)
        return self

    def options(self) -> dict[str, Any]:
        return self.distill.settings()

    def model_head(self) -> Head | None:
        return self.distill.task

    def metric_names(self) -> frozenset[str]:
        if not self.scored():
            return frozenset()
        with_labels = heads.HEADS[self.distill.task].classes == "num_labels"
        return super().metric_names() | {"teacher_agreement"} | ({"teacher_accuracy"} if with_labels else set())

    def data_sections(self) -> list[DataSection]:
        own = self.distill.head_settings()
        # the column the data must hold as text is the one the head's section names (sft: the prompt's)
        sections = super().data_sections() if own is None else [DataSection(None, ("data",), Data.model_validate(
            self.data.model_dump() | {"text_field": own.text_column()}))]
        if self.transfer is not None:
            sections.append(DataSection("transfer", ("transfer",), self.transfer, unlabelled=True))
        return sections

    def training_rows(self) -> dict[str, Any]:
        o = self.distill.settings()
        return {"task": o["task"]} | ({"block_size": o["block_size"]} if "block_size" in o
                                      else {"max_length": self.data.max_length})


STAGE = DistillStage
