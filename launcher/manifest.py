"""The manifest schema (version 1): typed, frozen, validated at load.

Every field carries a one-line description; `baton schema` exports the JSON Schema
from these same models. `load()` turns every problem into `file:line key.path: message`
and raises them together as one ConfigError.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from contract.kinds import KINDS
from contract.sections import (
    NAME_PATTERN,
    Checkpoint,
    DeepSpeed,
    EvalData,
    Launcher,
    Precision,
    Problem,
    RefBase,
    Slurm,
    StageBase,
    Strict,
    name_fits,
)
from contract.spec import MlflowSettings, Tracker, WandbSettings, default_report_to
from launcher.errors import ConfigError
from launcher.yamlmap import Path_, dotted, line_of, load_yaml

# The union of every registered kind's model, told apart by `kind`. For type checkers, a stage is a StageBase.
if typing.TYPE_CHECKING:
    Stage = StageBase
else:
    Stage = Annotated[Union[tuple(KINDS.values())], Field(discriminator="kind")]  # noqa: UP007


class Defaults(Strict):
    launcher: Launcher = Field(default_factory=Launcher, description="How many processes and nodes.")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed, description="DeepSpeed config and overrides.")
    seed: int = Field(1234, ge=0, le=2**32 - 1, strict=True,
                      description="Seed for model init, data order, masking and dropout (0 to 2^32 - 1: "
                      "SentencePiece takes a 32-bit seed).")
    precision: Precision = Field("fp32", description="Training precision.")
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, description="Checkpoints of every training stage.")
    slurm: Slurm = Field(default_factory=Slurm, description="sbatch settings of every stage, for `baton submit`.")


class Run(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=100, description="Run name; at most 100 bytes in UTF-8.")
    dir: str | None = Field(None, description="Run folder, relative to the working directory. Default runs/<name>.")
    report_to: list[Tracker] = Field(
        default_factory=default_report_to,
        description="Where every stage reports its metrics besides metrics.jsonl: tensorboard (event files in "
        "stages/<stage>/events.out.tfevents.*), wandb, mlflow; [] for none. Not part of the fingerprint.")
    wandb: WandbSettings = Field(default_factory=WandbSettings, description="Weights & Biases settings (report_to "
                                 "wandb); WANDB_* environment variables work too.")
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings, description="MLflow settings (report_to mlflow); "
                                   "MLFLOW_TRACKING_URI works too.")

    @field_validator("name")
    @classmethod
    def _name_bytes(cls, value: str) -> str:
        return name_fits(value)

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, value: list[Tracker]) -> list[Tracker]:
        twice = sorted({t for t in value if value.count(t) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named twice; name each tracker once")
        return value


class SharedEval(EvalData):
    """A shared eval set: every stage whose model fits its task is scored on it at its end, so the ledger and
    `baton status` show how each stage moved the same numbers."""

    task: Literal["classify", "text"] = Field(
        description="classify: scored by sequence classifiers (accuracy, macro_f1, eval_loss; label_field read "
        "through each model's own labels); text: scored by masked and causal language models under their own "
        "objective (eval_loss, perplexity).")
    stages: list[str] | None = Field(None, description="The stages scored on it; default: every stage whose model "
                                     "fits task.")


EVAL_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class Manifest(Strict):
    version: Literal[1] = Field(1, description="Manifest format version.")
    run: Run = Field(description="Name and folder of the run.")
    defaults: Defaults = Field(default_factory=Defaults, description="Inherited by every stage.")
    evals: dict[Annotated[str, Field(pattern=EVAL_NAME, max_length=64)], SharedEval] = Field(
        default_factory=dict, description="Shared eval sets by name (letters, digits, _): the stages are scored on "
        "them at their end, as metrics <name>/<metric>.")
    stages: list[Stage] = Field(min_length=1, description="The stages, in order.")


# ----------------------------------------------------------------- loading


class Loaded(BaseModel):
    """A validated manifest and where it came from (for later error messages)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    manifest: Manifest
    file: Path
    lines: dict[Path_, int]

    def where(self, path: Path_) -> str:
        return f"{self.file}:{line_of(self.lines, path)} {dotted(path)}"


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (draft 2020-12, as pydantic writes it), each stage's kind chosen by if/then rather
    than pydantic's discriminated `oneOf`: with `oneOf`, a generic validator (an editor's) reports a typo inside a
    stage as "not valid under any of the given schemas", with the real error buried among every other kind's."""
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "baton manifest",
           **{k: v for k, v in Manifest.model_json_schema(by_alias=True).items() if k != "title"}}
    return _by_kind(out)


def _by_kind(node: Any) -> Any:
    if isinstance(node, list):
        return [_by_kind(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _by_kind(v) for k, v in node.items()}
    if "discriminator" not in node or "oneOf" not in node:
        return node
    node.pop("oneOf")
    discriminator = node.pop("discriminator")
    key, mapping = discriminator["propertyName"], discriminator["mapping"]
    return {**node, "type": "object", "required": [key], "properties": {key: {"enum": list(mapping)}},
            "allOf": [{"if": {"properties": {key: {"const": value}}, "required": [key]}, "then": {"$ref": ref}}
                      for value, ref in mapping.items()]}


def load(file: Path) -> Loaded:
    """Read and validate a manifest: schema, then references between stages and to files."""
    data, lines = load_yaml(file)
    if not isinstance(data, dict):
        raise ConfigError(f"{file}:1 expected a mapping with run and stages, got {type(data).__name__}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise ConfigError(sorted({_describe(err, data, file, lines) for err in e.errors()}, key=_line_key)) from None
    loaded = Loaded(manifest=manifest, file=file, lines=lines)
    problems = check_references(loaded) + check_trackers(loaded)
    if problems:
        raise ConfigError(problems)
    return loaded


def check_references(loaded: Loaded) -> list[str]:
    """Cross-stage and cross-file checks the schema cannot express."""
    problems: list[str] = []
    seen: dict[str, StageBase] = {}
    base = loaded.file.parent
    stages = loaded.manifest.stages
    folded: dict[str, str] = {}  # casefolded name -> the name, for file systems that do not tell case apart
    for i, stage in enumerate(stages):
        if stage.name in seen:
            problems.append(f"{loaded.where(('stages', i, 'name'))}: duplicate stage name '{stage.name}'")
        elif folded.get(stage.name.casefold(), stage.name) != stage.name:
            problems.append(f"{loaded.where(('stages', i, 'name'))}: stage name '{stage.name}' differs from "
                            f"'{folded[stage.name.casefold()]}' only in case; their folders would be one on a "
                            "case-insensitive file system (macOS, Windows)")
        folded.setdefault(stage.name.casefold(), stage.name)
        refs = stage.references()
        for name, j, ref in flat_references(refs):
            if ref.from_ is None:
                continue
            at = ("stages", i, *stage.reference_key(name, j))
            written = at in loaded.lines  # else a default derived from another input
            where = loaded.where(at)
            upstream = seen.get(ref.from_)
            if upstream is None:
                if written:
                    later = ref.from_ in [s.name for s in stages[i:]]
                    hint = "it comes later; stages run in order" if later else f"known: {', '.join(seen) or 'none'}"
                    problems.append(f"{where}: unknown earlier stage '{ref.from_}'; {hint}")
            elif ref.needs not in upstream.outputs():
                gives = ", ".join(sorted(upstream.outputs()))
                fits = [n for n, _, r in flat_references(refs) if r.needs in upstream.outputs() and n != name]
                hint = f"; use {fits[0]}.from" if fits else ""
                if ref.needs == "train_losses" and getattr(upstream, "scores_train", False):
                    hint = f"; give stage '{ref.from_}' eval: {{score_train: true}}"
                problems.append(f"{where}: stage '{ref.from_}' is a {upstream.kind} stage and gives no {ref.needs} "
                                f"(it gives: {gives}){hint}")
            elif ref.needs == "adapter" and getattr(upstream, "init", None) != getattr(stage, "init", None):
                problems.append(f"{where}: stage '{ref.from_}' trained its adapter on another base model (init "
                                f"{_init(upstream)}, here {_init(stage)}); give this stage stage '{ref.from_}'s init")
        for section, key in ((section, key) for section in stage.data_sections() for key in ("train", "eval")):
            files = getattr(section.data, key)
            for j, name in enumerate([files] if isinstance(files, str) else files or []):
                path = ("stages", i, *section.path, key) + ((j,) if isinstance(files, list) else ())
                if os.path.expanduser(os.path.expandvars(name)) != name:
                    # datasets expands $VAR and ~ in data file paths, where the manifest means them literally
                    problems.append(f"{loaded.where(path)}: {name!r}: $VAR and ~ are not allowed in data paths "
                                    "(the data loader would expand them)")
                elif not (base / name).is_file():
                    problems.append(f"{loaded.where(path)}: data file not found: {base / name}")
        seen[stage.name] = stage
    return problems


# report_to value -> the module its stages import, and the extra that installs it
TRACKER_MODULES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_trackers(loaded: Loaded) -> list[str]:
    """Each tracker in run.report_to that this Python cannot import (asked without importing it: the driver
    never loads a tracker). The stages run in the same environment, so they would go without it."""
    problems = []
    for j, name in enumerate(loaded.manifest.run.report_to):
        module, extra = TRACKER_MODULES.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            problems.append(f"{loaded.where(('run', 'report_to', j))}: {name} is not installed in this Python "
                            f"({sys.executable}); pip install 'baton[{extra}]', or take {name} out of report_to")
    return problems


def _init(stage: Any) -> str:
    """A stage's init as messages show it: {from: …}, {pretrained: …} or {config: …}."""
    init = getattr(stage, "init", None)
    return "none" if init is None else str(init.model_dump(by_alias=True, exclude_none=True))


def flat_references(refs: dict[str, RefBase | list[RefBase]]) -> list[tuple[str, int | None, RefBase]]:
    """(input name, index in its list or None, reference) for every reference of a stage."""
    out: list[tuple[str, int | None, RefBase]] = []
    for name, value in refs.items():
        if isinstance(value, list):
            out += [(name, j, ref) for j, ref in enumerate(value)]
        else:
            out.append((name, None, value))
    return out


def _line_key(message: str) -> tuple[int, str]:
    head = message.split(" ", 1)[0]
    line = head.rsplit(":", 1)[-1]
    return (int(line) if line.isdigit() else 0, message)


def _describe(err: Any, data: Any, file: Path, lines: dict[Path_, int]) -> str:
    loc = err["loc"]
    path: Path_ = _data_path(data, loc)
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        msg = f"unknown key; valid keys here: {', '.join(valid)}" if valid else "unknown key"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        path = (*path, "kind")
        given = err.get("ctx", {}).get("tag")
        msg = f"unknown kind '{given}'" if kind == "union_tag_invalid" else "missing kind"
        msg += f"; valid kinds: {', '.join(KINDS)}"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind.startswith("literal_error") or kind in ("int_type", "float_type", "bool_type", "string_type"):
        msg = f"{msg}; got {err['input']!r}"[:300]
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        problem = err.get("ctx", {}).get("error")
        if isinstance(problem, Problem):
            path = _data_path(data, (*loc, *problem.path))
    return f"{file}:{line_of(lines, path)} {dotted(path) or '<top>'}: {msg}"


def _data_path(data: Any, loc: tuple) -> Path_:
    """The pydantic error location as a path into the YAML data (drops union tags)."""
    if len(loc) > 2 and loc[0] == "stages" and isinstance(loc[1], int):
        loc = (*loc[:2], *loc[3:])  # stages[i].<kind tag>.key -> stages[i].key
    path: list[str | int] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node
                or isinstance(node, list) and isinstance(part, int) and part < len(node)):
            node = node[part]
        else:
            path.append(part)  # missing key: keep it so the message names it
            break
        path.append(part)
    return tuple(path)


def _valid_keys(loc: tuple) -> list[str]:
    """Field names (aliases) of the model at a pydantic location."""
    tp: Any = Manifest
    for part in loc:
        tp = _unwrap(tp, part)
        if tp is None:
            return []
    tp = _unwrap(tp, None)
    if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return []
    return [f.alias or n for n, f in tp.model_fields.items()]


def _unwrap(tp: Any, part: Any) -> Any:
    """Step from a type to the type of `part` inside it (a field, list item or union tag)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tagged = [m for m in members if isinstance(m, type) and issubclass(m, StageBase)
                      and m.model_fields["kind"].annotation == Literal[part]]
            if tagged:
                return tagged[0]
            tp = members[0]
        else:
            break
    if part is None:
        return tp
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0] if isinstance(part, int) else None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for n, f in tp.model_fields.items():
            if part in (n, f.alias):
                return f.annotation
    return None
