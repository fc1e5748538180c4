"""`dpo`: preference tuning of a causal LM (Direct Preference Optimization, Rafailov et al. 2023). Each example is a
prompt with a chosen and a rejected answer, written by the sft head's template (the stage's `sft:` section,
PreferenceOptions); the policy (`init`, trained) learns to prefer the chosen answer more than a frozen reference
model (`init` as it was) does:

    L = −log σ(β · ((log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))))

with `dpo.loss` robust (the labels flipped with probability label_smoothing) or ipo as the alternatives. Eval: the sft
head's metrics on the chosen answers, and the rewards β · (log π − log π_ref) of both answers: rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies (TRL's names), logged per step too.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from contract.heads.sft import PreferenceOptions, check_columns
from contract.sections import Data, DataSection, Head, Problem, Strict, TrainingStage, finite_number

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class DpoOptions(Strict):
    """The manifest's `dpo:` section: the loss and where the reference model lives."""

    beta: float = Field(0.1, gt=0, description="β > 0: how far the policy may move from the reference; the rewards "
                        "are β · (log π − log π_ref) of an answer. For loss ipo, the regularisation τ.")
    loss: Literal["sigmoid", "robust", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's −log σ(β Δ); robust: the same with each label flipped with "
        "probability label_smoothing, unbiased (Chowdhury et al. 2024, TRL's robust); ipo: (Δ/tokens − 1/(2β))², "
        "each answer's log-ratio divided by its tokens (Azar et al. 2023, as TRL computes it).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="loss robust: the probability ε in [0, 0.5) "
                                   "that a pair's preference is wrong.")
    reference_placement: Literal["replicate", "zero3", "cpu", "adapter"] = Field(
        "replicate", description="Where the frozen reference (the init model as loaded) lives, as distill's "
        "teacher: replicate (a full copy per rank), zero3 (partitioned across the ranks, forward only), cpu; "
        "adapter: no copy at all, the policy's own frozen base with its adapter switched off (a stage that trains a "
        "new adapter: `adapter` without `from`), as TRL does with a peft model.")

    @field_validator("beta", "label_smoothing", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        return finite_number(value)

    @model_validator(mode="after")
    def _smoothing(self) -> DpoOptions:
        if self.label_smoothing and self.loss != "robust":
            raise Problem(("label_smoothing",), f"label_smoothing is for loss robust (loss is {self.loss})")
        return self


class DpoSettings(Strict):
    """spec.options of a dpo stage: its two sections."""

    dpo: DpoOptions
    sft: PreferenceOptions


class DpoStage(TrainingStage):
    options_field: ClassVar[str | None] = "dpo"
    head: ClassVar[Head | None] = "sft"

    kind: Literal["dpo"] = Field(description="Preference tuning of a causal LM (DPO): the chosen answer made likelier "
                                 "than the rejected one, against a frozen reference; eval: the sft metrics of the "
                                 "chosen answers and the rewards.")
    dpo: DpoOptions = Field(default_factory=DpoOptions, description="β, the loss, where the reference lives.")
    sft: PreferenceOptions = Field(default_factory=PreferenceOptions, description="Columns (prompt, chosen, "
                                   "rejected, or conversations), chat template, eval of the chosen answers.")

    @model_validator(mode="after")
    def _inputs(self) -> DpoStage:
        if self.init.config is not None:
            raise Problem(("init", "config"), "the reference is the init model as loaded, and an untrained one "
                          "prefers nothing: give init.from (e.g. an sft stage) or init.pretrained")
        check_columns(self.data, "dpo")
        if self.dpo.reference_placement == "adapter" and (self.adapter is None or self.adapter.from_ is not None):
            raise Problem(("dpo", "reference_placement"), "adapter: the reference is the policy's base with its "
                          "adapter switched off, which is the init model only when the stage trains a new adapter "
                          "(adapter: {r: …} without from); otherwise use replicate, zero3 or cpu")
        return self

    def options(self) -> dict[str, Any]:
        return {"dpo": self.dpo.model_dump(), "sft": self.sft.model_dump()}

    def metric_names(self) -> frozenset[str]:
        if not self.scored():
            return frozenset()
        return (super().metric_names() | set(REWARDS)) - self.sft.unreported()

    def data_sections(self) -> list[DataSection]:
        # the column the data must hold as text is the prompt's (or the conversation's): the launcher checks it
        return [DataSection(None, ("data",), Data.model_validate(self.data.model_dump()
                                                                 | {"text_field": self.sft.text_column()}))]


STAGE = DpoStage
