"""`teacher_logits`: a frozen teacher's top-k logits for every training row, stored once, so that a later `distill`
stage (its `teacher_logits: {from: <this stage>}`) learns from them without running the teacher (offline
distillation). Nothing is trained; final/ holds the logits (LOGITS_FILE), what they are (META_FILE) and the tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from contract import heads
from contract.sections import BLOCK_SIZE, ModelRef, Problem, StageBase, Strict, TokenizerRef

LOGITS_FILE = "teacher_logits.safetensors"  # in final/: "<split>.values" [rows, k] float32, "<split>.indices" int64
META_FILE = "teacher_logits.json"  # in final/: task, top_k, classes, the data the rows are of, the teacher


class TeacherLogitsOptions(Strict):
    """The manifest's `teacher_logits:` section; as spec.options it holds only what its task uses."""

    task: Annotated[str, AfterValidator(heads.check)] = Field(
        json_schema_extra={"enum": heads.names(storable=True)},
        description="The teacher's head and what a row is: classify (one row per example), clm (one row per "
        "predicted token of each packed block, as distill's). mlm is refused: its masks change every epoch.")
    top_k: int | None = Field(None, ge=1, le=1_000_000, strict=True, description="Logits kept per row, the largest "
                              "(with their class / token ids). Null: all classes (classify only; clm needs a number, "
                              "e.g. 32: a row of the whole vocabulary per token is too large to store).")
    batch_size: int = Field(16, ge=1, le=65536, strict=True, description="Examples (clm: blocks) per rank per "
                            "forward pass of the teacher.")
    block_size: int | None = Field(None, ge=8, le=1_048_576, strict=True, description="task clm: tokens per block; "
                                   f"the distill stage's distill.block_size must be the same. Default "
                                   f"{BLOCK_SIZE}.")

    @field_validator("task")
    @classmethod
    def _storable(cls, value: str) -> str:
        if value in heads.HEADS and not heads.HEADS[value].storable:
            raise ValueError(f"{value} cannot be stored: its rows are drawn anew every epoch (mlm's masked "
                             "positions), so the logits of one fixed draw would teach the wrong positions; distil "
                             f"{value} online (distill with teacher:)")
        return value

    @model_validator(mode="after")
    def _task_settings(self) -> TeacherLogitsOptions:
        if heads.HEADS[self.task].classes == "vocab_size" and self.top_k is None:
            raise Problem(("top_k",), f"task {self.task} needs top_k (e.g. 32): all logits would be a row of the "
                          "whole vocabulary per predicted token")
        for name, why in heads.option_problems(self.task, {"block_size": self.block_size}):
            raise Problem((name,), why)
        return self

    def settings(self) -> dict[str, Any]:
        """spec.options: the task's head settings (block_size) filled in, the others left out."""
        return self.model_dump(exclude={"block_size"}) | heads.settings(self.task, {"block_size": self.block_size})


class TeacherLogitsStage(StageBase):
    gives: ClassVar[frozenset[str]] = frozenset({"teacher_logits"})
    options_field: ClassVar[str | None] = "teacher_logits"
    same_vocabulary: ClassVar[tuple[tuple[str, str], ...]] = (("teacher", "tokenizer"),)
    tokenizer_from: ClassVar[str | None] = "teacher"

    kind: Literal["teacher_logits"] = Field(description="Offline distillation's first half: a frozen teacher's "
                                            "top-k logits for every training row (and eval row), for distill's "
                                            "teacher_logits input.")
    teacher: ModelRef = Field(description="The frozen teacher: an earlier stage (from) or a trained model folder / "
                              "hub name (pretrained), with the head of teacher_logits.task.")
    tokenizer: TokenizerRef | None = Field(None, description="Default: the tokenizer saved with the teacher.")
    teacher_logits: TeacherLogitsOptions = Field(description="Task, top_k, batch size, block size.")

    @model_validator(mode="after")
    def _teacher(self) -> TeacherLogitsStage:
        if self.teacher.config is not None:
            raise Problem(("teacher", "config"), "a teacher built from a config is untrained and teaches nothing; "
                          "give teacher.from (an earlier stage) or teacher.pretrained (a trained model)")
        return self

    def options(self) -> dict[str, Any]:
        return self.teacher_logits.settings()

    def metric_names(self) -> frozenset[str]:
        return frozenset({"accuracy"} if self.scored() else ())

    def training_rows(self) -> dict[str, Any]:
        o = self.teacher_logits.settings()
        return {"task": o["task"]} | ({"block_size": o["block_size"]} if "block_size" in o
                                      else {"max_length": self.data.max_length})


STAGE = TeacherLogitsStage
