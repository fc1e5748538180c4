"""`teacher_logits`: a frozen teacher's top-k logits for every training row, stored once, so that a later `distill`
stage (its `teacher_logits: {from: <this stage>}`) learns from them without running the teacher (offline
distillation). Nothing is trained; final/ holds the logits (LOGITS_FILE), what they are (META_FILE) and the tokenizer.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from contract.sections import BLOCK_SIZE, ModelRef, Problem, StageBase, Strict, TokenizerRef

LOGITS_FILE = "teacher_logits.safetensors"  # in final/: "<split>.values" [rows, k] float32, "<split>.indices" int64
META_FILE = "teacher_logits.json"  # in final/: task, top_k, classes, the data the rows are of, the teacher


class TeacherLogitsOptions(Strict):
    """The manifest's `teacher_logits:` section; as spec.options it holds only what its task uses."""

    task: Literal["classify", "mlm", "clm"] = Field(
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
    def _not_mlm(cls, value: str) -> str:
        if value == "mlm":
            raise ValueError("mlm cannot be stored: the masked positions are drawn anew every epoch, so the logits "
                             "of one fixed masking would teach the wrong positions; distil mlm online (distill with "
                             "teacher:)")
        return value

    @model_validator(mode="after")
    def _task_settings(self) -> TeacherLogitsOptions:
        if self.task == "clm" and self.top_k is None:
            raise Problem(("top_k",), "task clm needs top_k (e.g. 32): all logits would be a row of the whole "
                          "vocabulary per predicted token")
        if self.block_size is not None and self.task != "clm":
            raise Problem(("block_size",), f"block_size is for task clm (task is {self.task})")
        return self

    def settings(self) -> dict[str, Any]:
        """spec.options: clm's block_size filled in, left out for classify."""
        out = self.model_dump(exclude={"block_size"})
        if self.task == "clm":
            out["block_size"] = self.block_size or BLOCK_SIZE
        return out


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
        return {"task": o["task"]} | ({"block_size": o["block_size"]} if o["task"] == "clm"
                                      else {"max_length": self.data.max_length})


STAGE = TeacherLogitsStage
