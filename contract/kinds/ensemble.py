"""`ensemble`: combine models of earlier stages (or local folders) with one head (`task`), training nothing.

- `logits`: the weighted average of the members' predicted probabilities (a causal LM's: of each next token);
  final/ holds every member and `ensemble.json`, loaded with `stages.runtime.ensemble.load`.
- `uniform_soup`: the uniform average of the members' weights (one architecture); final/ is one model.
- `greedy_soup` (Wortsman et al. 2022): members by held-out accuracy, best first, each kept in the soup only if
  the soup's held-out accuracy (data.eval) does not drop; final/ is one model.
- `task_arithmetic`, `ties`, `dare` against `base`, and `slerp` between two members: merges as mergekit makes them
  (stages/runtime/merging.py); final/ is one model.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from contract import heads
from contract.sections import DataSection, EvalData, Head, ModelRef, Problem, StageBase, Strict, TokenizerRef

Method = Literal["logits", "uniform_soup", "greedy_soup", "task_arithmetic", "ties", "dare", "slerp"]
TASK_VECTORS = ("task_arithmetic", "ties", "dare")  # the merges of the members' differences from a base
WEIGHTED = ("logits", *TASK_VECTORS)
# Settings added after stages existed: left out of spec.options at their defaults, so those stages keep their
# fingerprints
ADDED: dict[str, Any] = {"task": "classify", "head": {}, "densities": None, "normalize": None, "rescale": None,
                         "t": None}


class EnsembleOptions(Strict):
    """The manifest's `ensemble:` section (spec.options)."""

    method: Method = Field(
        description="logits: the weighted average of the members' predicted probabilities (final/ holds every "
        "member; load it with stages.runtime.ensemble.load); uniform_soup: the average of the members' weights "
        "(they must share one architecture; final/ is one model); greedy_soup: members in order of held-out "
        "accuracy, each added to the soup only if the soup's accuracy on data.eval does not drop; "
        "task_arithmetic, ties (Yadav et al. 2023), dare (Yu et al. 2023): base plus the members' differences "
        "from base, merged as mergekit does; slerp: the spherical interpolation of two members at t. The merges' "
        "final/ is one model.",
    )
    task: Annotated[str, AfterValidator(heads.check)] = Field(
        "classify", json_schema_extra={"enum": heads.names()},
        description="The members' head: classify (sequence classifiers with one label set), mlm, clm or sft "
        "(causal LMs; a logits ensemble of those averages each next token's probabilities).")
    head: dict[str, Any] = Field(
        default_factory=dict, description="The task's own settings, for a head that has a section of its own: task "
        "sft takes an sft stage's `sft:` section here (prompt_field, completion_field, label_set, max_new_tokens "
        "…), which data.eval is read and scored with. Default: that head's defaults.")
    weights: list[float] | None = Field(
        None, description="logits, task_arithmetic, ties, dare: one weight per member, each ≥ 0, their sum > 0. "
        "logits: normalised to sum 1; the merges: each task vector's factor (mergekit's weight). Default: 1 each.",
    )
    densities: list[float] | None = Field(
        None, description="ties, dare: one per member, in (0, 1]: the share of its task vector kept (ties: the "
        "largest entries; dare: a random draw, seeded by the stage's seed). Default: 1 each (nothing dropped).")
    normalize: bool | None = Field(
        None, description="task_arithmetic, ties, dare: divide the merged task vector by the sum of the weights "
        "(ties: of the members that agree with the elected sign, per entry). Default: true for ties, else false "
        "(mergekit's).")
    rescale: bool | None = Field(
        None, description="ties, dare: scale each trimmed task vector back to its L1 norm. Default: true for dare, "
        "false for ties (mergekit's).")
    t: float | None = Field(None, ge=0, le=1, description="slerp: where between the two members, 0 (the first) to "
                            "1 (the second). Default: 0.5.")
    batch_size: int = Field(32, ge=1, le=65536, strict=True, description="Eval examples per rank per forward pass.")

    @field_validator("densities", mode="before")
    @classmethod
    def _shares(cls, value: Any) -> Any:
        if isinstance(value, list):
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
                raise ValueError(f"{value!r}: numbers are expected (one density per member)")
            if any(not (0 < v <= 1) for v in value):
                raise ValueError(f"{value!r}: each density must be in (0, 1]")
        return value

    def head_settings(self) -> Any:
        """The task's own section (its head's settings model), or None for a head without one."""
        model = heads.HEADS[self.task].settings
        return None if model is None else model.model_validate(self.head)

    def head_options(self) -> dict[str, Any]:
        """What the task's head reads: its options' defaults, and its own section."""
        own = self.head_settings()
        return heads.settings(self.task, {}) | (own.model_dump() if own is not None else {})

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
    gives: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer"})  # a soup's or merge's; see outputs()

    kind: Literal["ensemble"] = Field(description="Combine models of earlier stages: a logits ensemble, a uniform or "
                                      "greedy weight soup, a task-vector merge or a slerp; trains nothing.")
    members: list[ModelRef] = Field(
        min_length=2, max_length=64, description="The models combined, each {from: <stage>} or {pretrained: "
        "<folder>}, all with the head of ensemble.task (classifiers: the same labels).",
    )
    base: ModelRef | None = Field(
        None, description="task_arithmetic, ties, dare: the model the members were fine-tuned from, {from: <stage>} "
        "or {pretrained: <folder>}, with every tensor the members have; its task vectors are member − base.")
    tokenizer: TokenizerRef | None = Field(None, description="Default: the tokenizer saved with the first member. "
                                           "Every member must use this vocabulary.")
    data: EvalData | None = Field(  # type: ignore[assignment]  # eval data only, and optional
        None, description="Eval data (data.eval, or hub with eval_split; read as ensemble.task reads it), on which "
        "each member and the ensemble are scored. Required by greedy_soup; without it nothing is scored.",
    )
    ensemble: EnsembleOptions = Field(description="How the members are combined.")

    @model_validator(mode="after")
    def _members(self) -> EnsembleStage:
        for j, member in enumerate([*self.members, *([self.base] if self.base else [])]):
            if member.config is not None:
                which = "member" if j < len(self.members) else "base"
                where = ("members", j, "config") if j < len(self.members) else ("base", "config")
                raise Problem(where, f"a {which} built from a config would be an untrained model: give {which}"
                              f"{'s[]' if which == 'member' else ''}.from (an earlier stage) or .pretrained (a folder)")
        o = self.ensemble
        given = o.model_fields_set
        if o.weights is not None and o.method not in WEIGHTED:
            raise Problem(("ensemble", "weights"), f"weights are for methods {', '.join(WEIGHTED)}; a {o.method} "
                          + ("interpolates at t" if o.method == "slerp" else "averages its members' weights uniformly"))
        for name in ("weights", "densities"):
            values = getattr(o, name)
            if values is not None and len(values) != len(self.members):
                raise Problem(("ensemble", name), f"{len(values)} {name} for {len(self.members)} members: give one "
                              "per member")
        for name, methods in (("densities", ("ties", "dare")), ("rescale", ("ties", "dare")),
                              ("normalize", TASK_VECTORS), ("t", ("slerp",))):
            if name in given and getattr(o, name) is not None and o.method not in methods:
                raise Problem(("ensemble", name), f"{name} is for method {' or '.join(methods)} (method is "
                              f"{o.method})")
        if o.method in TASK_VECTORS and self.base is None:
            raise Problem(("ensemble", "method"), f"{o.method} merges the members' differences from the model they "
                          "were fine-tuned from: give base ({from: <stage>} or {pretrained: <folder>})")
        if o.method not in TASK_VECTORS and self.base is not None:
            raise Problem(("base",), f"base is for methods {', '.join(TASK_VECTORS)} (method is {o.method})")
        if o.method == "slerp" and len(self.members) != 2:
            raise Problem(("members",), f"slerp interpolates between two members, not {len(self.members)}")
        if o.method == "greedy_soup" and self.data is None:
            raise Problem(("ensemble", "method"), "greedy_soup chooses its members on held-out data: give data.eval")
        if o.head and heads.HEADS[o.task].settings is None:
            raise Problem(("ensemble", "head"), f"task {o.task} has no settings of its own; leave head out")
        try:
            o.head_settings()
        except ValidationError as e:  # its model's first error, under ensemble.head
            error = e.errors()[0]
            raise Problem(("ensemble", "head", *error["loc"]), error["msg"].removeprefix("Value error, ")) from None
        if o.method == "greedy_soup" and "accuracy" not in self.metric_names():
            raise Problem(("ensemble", "method"), f"greedy_soup chooses by held-out accuracy, which task {o.task} "
                          "does not report here" + (" (give ensemble.head.label_set)" if o.head_settings() else ""))
        return self

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.ensemble.model_dump().items() if k not in ADDED or v != ADDED[k]}

    def model_head(self) -> Head | None:
        return self.ensemble.task

    def metric_names(self) -> frozenset[str]:
        names = super().metric_names()
        own = self.ensemble.head_settings()
        if own is not None:  # the answers' metrics, where the head's section asks for them (sft's)
            names -= {"exact_match"} if not getattr(own, "max_new_tokens", 0) else set()
            names -= {"accuracy"} if getattr(own, "label_set", None) is None else set()
        if self.ensemble.method == "logits" and heads.HEADS[self.ensemble.task].classes == "vocab_size":
            names &= set(heads.SET_METRICS["text"])  # combined next-token probabilities: no generation
        return names

    def outputs(self) -> frozenset[str]:
        # a logits ensemble is several models and ensemble.json: no `init` can start from it
        return frozenset({"ensemble", "tokenizer"}) if self.ensemble.method == "logits" else self.gives

    def data_sections(self) -> list[DataSection]:
        if self.data is None:
            return []
        own = self.ensemble.head_settings()
        if own is None or not hasattr(own, "text_column"):
            return [DataSection(None, ("data",), self.data)]
        # the column the data must hold as text is the one the head's section names (sft: the prompt's)
        return [DataSection(None, ("data",), EvalData.model_validate(self.data.model_dump()
                                                                     | {"text_field": own.text_column()}))]


STAGE = EnsembleStage
