"""What a manifest stage runs as, and the rule its decisions follow; checked when the manifest loads.

A stage runs as one *instance* (its own folder, ledger entry and fingerprint): itself; or with `gate.retries`, one
more per retry attempt (`<stage>@2`, `<stage>@3` …, each the stage with that attempt's overrides); or with
`variants`, one per variant (`<stage>@v1` …). Later stages read the stage's hand-on, which `launcher.decisions`
picks from its instances (or from a fallback stage) by the `Rule`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from contract import gates
from contract.heads import HEADS, SET_METRICS
from contract.kinds import KINDS
from contract.sections import Gate, StageBase
from launcher.errors import ConfigError
from launcher.manifest import Loaded, flat_references

Role = Literal["stage", "retry", "variant"]


@dataclass(frozen=True)
class Instance:
    name: str  # folder and ledger name: <stage>, <stage>@2, <stage>@v1
    stage: StageBase  # the manifest's stage with `overrides` applied
    role: Role
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    """One gate condition, its owners resolved: `owners` maps each owner the text names to its stage."""

    condition: gates.Condition
    owners: dict[str, str]


@dataclass(frozen=True)
class Rule:
    """What decides a stage's hand-on: its gate's checks and action, its variants' selection."""

    checks: tuple[Check, ...] = ()
    on_fail: str = "stop"
    fallback: str | None = None
    select: tuple[str, str] | None = None  # ("max" | "min", metric)

    @property
    def reads(self) -> tuple[str, ...]:
        """The earlier stages a decision reads: the fallback and the owners of the conditions' metrics."""
        owners = [o for c in self.checks for o in c.owners.values()]
        return tuple(dict.fromkeys([*owners, *([self.fallback] if self.fallback else [])]))

    @property
    def digest(self) -> str:
        """Of what the rule decides by: a recorded decision is replayed only under the same rule."""
        blob = json.dumps([[c.condition.text, c.owners] for c in self.checks] + [self.on_fail, self.fallback,
                          self.select], sort_keys=True)
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def instances(loaded: Loaded, i: int) -> list[Instance]:
    """The instances of stage `i`; a bad override is refused with its line."""
    stage = loaded.manifest.stages[i]
    if stage.variants is not None:
        grid = stage.variants.grid is not None
        at = ("stages", i, "variants", "grid" if grid else "each")
        return [_instance(loaded, i, f"{stage.name}@v{k}", "variant", o, at if grid else (*at, k - 1))
                for k, o in enumerate(stage.variants.overrides(), 1)]
    retries = stage.gate.retries if stage.gate is not None and stage.gate.retries else []
    return [Instance(stage.name, stage, "stage")] + [
        _instance(loaded, i, f"{stage.name}@{k}", "retry", o, ("stages", i, "gate", "retries", k - 2))
        for k, o in enumerate(retries, 2)]


def _instance(loaded: Loaded, i: int, name: str, role: Role, overrides: dict[str, Any],
              at: tuple[str | int, ...]) -> Instance:
    stage = loaded.manifest.stages[i]
    data = stage.model_dump(by_alias=True, exclude_unset=True)
    problems = []
    for key, value in overrides.items():
        try:
            _set(data, key.split("."), copy.deepcopy(value))
        except (KeyError, IndexError, TypeError) as e:
            problems.append(f"{loaded.where((*at, key))}: {key}: {e.args[0] if e.args else e}")
    if not problems:
        try:
            return Instance(name, KINDS[stage.kind].model_validate(data), role, overrides)
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(p) for p in err["loc"])
                given = next((k for k in overrides if loc.startswith(k) or k.startswith(loc)), None)
                where = loaded.where((*at, given) if given else at)
                problems.append(f"{where}: {name}: {loc}: {err['msg'].removeprefix('Value error, ')}")
    raise ConfigError(problems)


def _set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node: Any = data
    for k, key in enumerate(keys):
        last = k == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise IndexError(f"{key!r} is not an item of this list (0 to {len(node) - 1})")
            if last:
                node[int(key)] = value
            node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise TypeError(f"{'.'.join(keys[:k])} is not a section; it holds {node!r:.40}")


# ----------------------------------------------------------------- the rule


def shared_sets(loaded: Loaded, stage: StageBase) -> list[str]:
    """The shared eval sets (manifest `evals:`) the stage is scored on: those whose task its model fits."""
    head = stage.model_head()
    if head is None:
        return []
    fits = HEADS[head].fits
    return [name for name, s in loaded.manifest.evals.items()
            if s.task == fits and (s.stages is None or stage.name in s.stages)]


def metrics_of(loaded: Loaded, stage: StageBase) -> frozenset[str]:
    """Every metric a stage reports: its own and its shared eval sets'."""
    shared = {f"{name}/{m}" for name in shared_sets(loaded, stage)
              for m in SET_METRICS[loaded.manifest.evals[name].task]}
    return stage.metric_names() | shared


def check_evals(loaded: Loaded) -> list[str]:
    """A shared eval set's `stages` must name stages whose model fits its task."""
    problems = []
    by_name = {s.name: s for s in loaded.manifest.stages}
    for name, s in loaded.manifest.evals.items():
        for j, stage_name in enumerate(s.stages or []):
            stage = by_name.get(stage_name)
            head = stage.model_head() if stage else None
            if stage is None:
                why = f"no stage '{stage_name}'; stages: {', '.join(by_name)}"
            elif head is None or HEADS[head].fits != s.task:
                output = f"is a {head} model" if head else f"is no model a {s.task} set can score"
                scores = "sequence classifiers" if s.task == "classify" else "language models"
                why = (f"stage '{stage_name}' is a {stage.kind} stage, whose output {output}; a {s.task} set scores "
                       f"{scores}")
            else:
                continue
            problems.append(f"{loaded.where(('evals', name, 'stages', j))}: {why}")
    return problems


def rule(loaded: Loaded, i: int) -> Rule | None:
    """Stage `i`'s decision rule, every metric and owner checked; None for a stage without gate or variants."""
    stage = loaded.manifest.stages[i]
    if stage.gate is None and stage.variants is None:
        return None
    earlier = {s.name: s for s in loaded.manifest.stages[:i]}
    problems: list[str] = []
    own = metrics_of(loaded, stage)
    select = None
    if stage.variants is not None:
        goal, metric = ("max", stage.variants.select.max) if stage.variants.select.max else (
            "min", stage.variants.select.min)
        assert metric is not None
        if metric not in own:
            problems.append(f"{loaded.where(('stages', i, 'variants', 'select', goal))}: "
                            f"{_unknown(metric, stage, own)}")
        select = (goal, metric)
    gate: Gate | None = stage.gate
    checks = []
    for j, text in enumerate(gate.require if gate else []):
        where = loaded.where(("stages", i, "gate", "require", j))
        try:
            condition = gates.parse(text)
        except gates.GateSyntaxError as e:
            problems.append(f"{where}: {e}")
            continue
        owners: dict[str, str] = {}
        for ref in gates.refs(condition):
            if ref.owner is None:
                if ref.metric not in own:
                    problems.append(f"{where}: {_unknown(ref.metric, stage, own)}")
                continue
            owner, why = _owner(stage, ref.owner, earlier)
            if owner is None:
                problems.append(f"{where}: {ref}: {why}")
                continue
            theirs = metrics_of(loaded, earlier[owner])
            if ref.metric not in theirs:
                problems.append(f"{where}: {ref}: {_unknown(ref.metric, earlier[owner], theirs)}")
            owners[ref.owner] = owner
        checks.append(Check(condition, owners))
    if gate is not None and gate.fallback is not None:
        where = loaded.where(("stages", i, "gate", "fallback"))
        target = earlier.get(gate.fallback)
        if target is None:
            problems.append(f"{where}: '{gate.fallback}' is no earlier stage; earlier: {', '.join(earlier) or 'none'}")
        elif not stage.outputs() <= target.outputs():
            problems.append(f"{where}: stage '{gate.fallback}' gives {', '.join(sorted(target.outputs()))}, but what "
                            f"this stage hands on ({', '.join(sorted(stage.outputs()))}) must come from it instead")
    if problems:
        raise ConfigError(problems)
    return Rule(tuple(checks), gate.on_fail if gate else "stop", gate.fallback if gate else None, select)


def _owner(stage: StageBase, owner: str, earlier: dict[str, StageBase]) -> tuple[str | None, str]:
    """The earlier stage that `owner` (upstream, an input's name, a stage's name) means; else (None, why)."""
    refs = flat_references(stage.references())
    if owner == "upstream":
        models = [r.from_ for _, _, r in refs if r.needs == "model" and r.from_ is not None]
        return (models[0], "") if models else (None, "this stage's model comes from no earlier stage")
    named = [r for n, j, r in refs if n == owner and j is None]
    if named:
        return (named[0].from_, "") if named[0].from_ else (None, f"input {owner} is no earlier stage's output: "
                                                             "it has no metrics")
    if owner in earlier:
        return owner, ""
    return None, f"'{owner}' is neither upstream, an input of this stage nor an earlier stage"


def _unknown(metric: str, stage: StageBase, known: frozenset[str]) -> str:
    shown = ", ".join(sorted(known)) or "none (it has no eval data)"
    return f"unknown metric '{metric}': stage '{stage.name}' ({stage.kind}) reports {shown}"
