"""`ensemble`: combine sequence classifiers of earlier stages (or local folders), training nothing.

- `logits`: the weighted average of the members' predicted probabilities; final/ holds every member and
  `ensemble.json`, loaded with `stages.runtime.ensemble.load`.
- `uniform_soup`: the uniform average of the members' weights (one architecture); final/ is one model.
- `greedy_soup` (Wortsman et al. 2022): members by held-out accuracy, best first, each kept in the soup only if
  the soup's held-out accuracy (data.eval) does not drop; final/ is one model.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from contract.sections import DataSection, EvalData, Head, ModelRef, Problem, StageBase, Strict, TokenizerRef

Method = Literal["logits", "uniform_soup", "greedy_soup"]


class EnsembleOptions(Strict):
    """The manifest's `ensemble:` section (spec.options)."""

    method: Method = Field(
        description="logits: the weighted average of the members' predicted probabilities (final/ holds every "
        "member; load it with stages.runtime.ensemble.load); uniform_soup: the average of the members' weights "
        "(they must share one architecture; final/ is one model); greedy_soup: members in order of held-out "
        "accuracy, each added to the soup only if the soup's accuracy on data.eval does not drop.",
    )
    weights: list[float] | None = Field(
        None, description="logits only: one weight per member, each ≥ 0, their sum > 0 (normalised to sum 1). "
        "Default: uniform.",
    )
    batch_size: int = Field(32, ge=1, le=65536, strict=True, description="Eval examples per rank per forward pass.")

    @field_validator("weights", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        if isinstance(value, list):
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
                raise ValueError(f"{value!r}: numbers are expected (one weight per member)")
            if any(not math.isfinite(v) or v < 0 for v in value):
                raise ValueError(f"{value!r}: each weight must be a finite number ≥ 0")
            if not sum(value) > 0:
                raise ValueError(f"{value!r}: the weights sum to 0; at least one must be > 0")
        return value


class EnsembleStage(StageBase):
    options_field: ClassVar[str | None] = "ensemble"
    tokenizer_from: ClassVar[str | None] = "members"  # the first member's
    gives: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer"})  # a soup's; see outputs()
    head: ClassVar[Head | None] = "classify"

    kind: Literal["ensemble"] = Field(description="Combine classifiers of earlier stages: a logits ensemble, a "
                                      "uniform or a greedy weight soup; trains nothing.")
    members: list[ModelRef] = Field(
        min_length=2, max_length=64, description="The sequence classifiers combined, each {from: <stage>} or "
        "{pretrained: <folder>}; all with the same labels.",
    )
    tokenizer: TokenizerRef | None = Field(None, description="Default: the tokenizer saved with the first member. "
                                           "Every member must use this vocabulary.")
    data: EvalData | None = Field(  # type: ignore[assignment]  # eval data only, and optional
        None, description="Eval data (data.eval, or hub with eval_split; label_field, labels as classify), on which "
        "each member and the ensemble are scored. Required by greedy_soup; without it nothing is scored.",
    )
    ensemble: EnsembleOptions = Field(description="How the members are combined.")

    @model_validator(mode="after")
    def _members(self) -> EnsembleStage:
        for j, member in enumerate(self.members):
            if member.config is not None:
                raise Problem(("members", j, "config"), "a member built from a config would be an untrained model: "
                              "give members[].from (an earlier stage) or members[].pretrained (a folder)")
        o = self.ensemble
        if o.weights is not None and o.method != "logits":
            raise Problem(("ensemble", "weights"), f"weights are for method logits; a {o.method} averages its "
                          "members' weights uniformly")
        if o.weights is not None and len(o.weights) != len(self.members):
            raise Problem(("ensemble", "weights"), f"{len(o.weights)} weights for {len(self.members)} members: "
                          "give one per member")
        if o.method == "greedy_soup" and self.data is None:
            raise Problem(("ensemble", "method"), "greedy_soup chooses its members on held-out data: give data.eval")
        return self

    def outputs(self) -> frozenset[str]:
        # a logits ensemble is several models and ensemble.json: no `init` can start from it
        return frozenset({"ensemble", "tokenizer"}) if self.ensemble.method == "logits" else self.gives

    def data_sections(self) -> list[DataSection]:
        return [] if self.data is None else [DataSection(None, ("data",), self.data)]


STAGE = EnsembleStage
