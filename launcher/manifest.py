"""The manifest schema (version 1): typed, frozen, validated at load.

Every field carries a one-line description; `baton schema` exports the JSON Schema
from these same models. `load()` turns every problem into `file:line key.path: message`
and raises them together as one ConfigError.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from launcher.errors import ConfigError
from launcher.yamlmap import Path_, dotted, line_of, load_yaml

KINDS = ("tokenizer", "mlm", "classify")
NAME_PATTERN = r"^[^/\x00-\x1f.][^/\x00-\x1f]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def exactly_one(model: BaseModel, *names: str) -> None:
    """Raise unless exactly one of the fields `names` is set (messages use the YAML spelling)."""
    given = [n.rstrip("_") for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        shown = ", ".join(n.rstrip("_") for n in names)
        raise ValueError(f"give exactly one of: {shown} (got {', '.join(given) or 'none'})")


# ----------------------------------------------------------------- shared settings


class LauncherSettings(Strict):
    nproc_per_node: int | None = Field(None, ge=1, description="Processes per node (GPUs per node; CPU ranks here). Default 1.")
    nnodes: int | None = Field(None, ge=1, description="Nodes. More than 1 needs the Slurm back-end. Default 1.")


class DeepSpeedSettings(Strict):
    config: str | None = Field(
        None,
        description="A file of ds_configs/ by name (zero0, zero1, zero2, zero3, zero2_offload, zero3_offload) "
        "or a path to a DeepSpeed JSON config, relative to the manifest. Default zero2.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Merged key by key onto the config file (nested mappings merge)."
    )


class SlurmSettings(Strict):
    """sbatch settings; a stage's values override defaults.slurm field by field."""

    partition: str | None = Field(None, description="Partition (--partition).")
    account: str | None = Field(None, description="Account to charge (--account).")
    qos: str | None = Field(None, description="Quality of service (--qos).")
    constraint: str | None = Field(None, description="Node features (--constraint).")
    time: str | None = Field(None, description="Time limit, as sbatch takes it: minutes, HH:MM:SS or D-HH:MM:SS.")
    mem: str | None = Field(None, description="Memory per node (--mem), e.g. 64G.")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs for each node's torchrun (--cpus-per-task).")
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per node (--gpus-per-node); default none.")
    extra: dict[str, str | int | None] | None = Field(
        None, description="More sbatch flags: {flag: value}, or {flag: null} for a bare flag such as exclusive."
    )
    preamble: str | None = Field(
        None, description="A shell file (relative to the manifest) pasted into the job script before baton starts: "
        "module loads, environment activation."
    )
    signal_before_s: int | None = Field(None, ge=10, description="Seconds before the time limit that Slurm warns the "
                                        "stage (USR1), so it checkpoints and requeues. Default 120.")
    max_requeues: int | None = Field(None, ge=0, description="How often a preempted or timed-out stage requeues itself. "
                                     "Default 3.")


class Defaults(Strict):
    launcher: LauncherSettings = Field(default_factory=LauncherSettings, description="How many processes and nodes.")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="DeepSpeed config and overrides.")
    seed: int | None = Field(None, description="Seed for model init, data order, masking and dropout. Default 1234.")
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="Training precision. Default fp32.")
    slurm: SlurmSettings = Field(default_factory=SlurmSettings, description="sbatch settings for `baton submit`.")


class Init(Strict):
    from_: str | None = Field(None, alias="from", description="An earlier stage whose final/ model this stage starts from.")
    pretrained: str | None = Field(None, description="A local model folder (relative to the manifest) or a hub name.")
    config: dict[str, Any] | None = Field(
        None, description="Build from scratch: AutoConfig.for_model(**config); needs model_type, e.g. bert."
    )

    @model_validator(mode="after")
    def _one(self) -> Init:
        exactly_one(self, "from_", "pretrained", "config")
        if self.config is not None and not isinstance(self.config.get("model_type"), str):
            raise ValueError("config needs model_type (e.g. bert, roberta, distilbert)")
        return self


class TokenizerRef(Strict):
    from_: str | None = Field(None, alias="from", description="An earlier stage whose final/ holds the tokenizer.")
    pretrained: str | None = Field(None, description="A local tokenizer folder (relative to the manifest) or a hub name.")

    @model_validator(mode="after")
    def _one(self) -> TokenizerRef:
        exactly_one(self, "from_", "pretrained")
        return self


class Data(Strict):
    train: str | list[str] | None = Field(None, description="Training file(s), relative to the manifest: .json/.jsonl/.csv/.parquet/.txt.")
    eval: str | list[str] | None = Field(None, description="Evaluation file(s), same formats.")
    format: Literal["auto", "json", "csv", "parquet", "text"] = Field(
        "auto", description="File format; auto picks it from the file extension."
    )
    hub: str | None = Field(None, description="A `datasets` hub name, instead of train/eval files.")
    hub_config: str | None = Field(None, description="The hub dataset's configuration name.")
    train_split: str = Field("train", description="Hub split to train on.")
    eval_split: str | None = Field(None, description="Hub split to evaluate on.")
    text_field: str = Field("text", description="Column with the text (text files: always `text`).")
    text_pair_field: str | None = Field(None, description="Second text column for sentence-pair tasks.")
    label_field: str = Field("label", description="Column with the label (classify).")
    labels: list[str] | None = Field(None, description="Label names in id order; default: sorted labels of the train split.")
    max_length: int = Field(128, ge=8, le=65536, description="Tokens per example after truncation.")

    @model_validator(mode="after")
    def _source(self) -> Data:
        if (self.train is None) == (self.hub is None):
            raise ValueError("give exactly one of: train (local files) or hub (a datasets name)")
        if self.hub is not None and self.eval is not None:
            raise ValueError("with hub, name the evaluation split in eval_split instead of eval files")
        return self


class Train(Strict):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to train (or give epochs).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (or give max_steps).")
    micro_batch_size: int = Field(8, ge=1, description="Examples per rank per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None, ge=1, description="If given, must equal micro_batch_size × grad_accum × world size."
    )
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    log_every: int = Field(10, ge=1, description="Progress line and metrics record every N steps.")

    @model_validator(mode="after")
    def _length(self) -> Train:
        exactly_one(self, "max_steps", "epochs")
        return self


class Checkpoint(Strict):
    every_steps: int | None = Field(None, gt=0, description="Save a resumable checkpoint every N steps (also on a signal).")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints to keep.")


class Eval(Strict):
    every_steps: int | None = Field(None, gt=0, description="Evaluate every N steps.")
    at_end: bool = Field(True, description="Evaluate after the last step.")


# ----------------------------------------------------------------- stages


class StageBase(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=100, description="Unique stage name; also its folder name.")
    launcher: LauncherSettings = Field(default_factory=LauncherSettings, description="Overrides defaults.launcher.")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="Overrides defaults.deepspeed.")
    seed: int | None = Field(None, description="Overrides defaults.seed.")
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="Overrides defaults.precision.")
    slurm: SlurmSettings = Field(default_factory=SlurmSettings, description="Overrides defaults.slurm, field by field.")
    data: Data = Field(description="What the stage reads.")


class SentencePiece(Strict):
    vocab_size: int = Field(8000, ge=64, description="Vocabulary size, special tokens included.")
    model_type: Literal["unigram", "bpe"] = Field("unigram", description="SentencePiece algorithm.")
    character_coverage: float = Field(1.0, gt=0, le=1, description="Share of characters the vocabulary covers.")
    max_sentences: int = Field(1_000_000, ge=1, description="Lines sampled from the data to train on.")
    lowercase: bool = Field(False, description="Lowercase text before training and encoding.")


class TokenizerStage(StageBase):
    kind: Literal["tokenizer"] = Field(description="Train a SentencePiece tokenizer; saves a Hugging Face tokenizer folder.")
    sentencepiece: SentencePiece = Field(default_factory=SentencePiece, description="Tokenizer training settings.")


class MlmOptions(Strict):
    mask_prob: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked (80% [MASK], 10% random, 10% kept).")


class ModelStage(StageBase):
    init: Init = Field(description="Where the weights come from.")
    tokenizer: TokenizerRef | None = Field(None, description="Default: the tokenizer saved with the init model.")
    train: Train = Field(description="Optimisation settings.")
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, description="Resumable checkpoints.")
    eval: Eval = Field(default_factory=Eval, description="When to evaluate.")


class MlmStage(ModelStage):
    kind: Literal["mlm"] = Field(description="Masked-LM pretraining or continued (domain-adaptive) pretraining.")
    mlm: MlmOptions = Field(default_factory=MlmOptions, description="Masking settings.")


class ClassifyStage(ModelStage):
    kind: Literal["classify"] = Field(description="Sequence-classification fine-tuning; eval: accuracy, macro-F1.")


Stage = Annotated[Union[TokenizerStage, MlmStage, ClassifyStage], Field(discriminator="kind")]  # noqa: UP007


class Run(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=100, description="Run name.")
    dir: str | None = Field(None, description="Run folder, relative to the working directory. Default runs/<name>.")


class Manifest(Strict):
    version: Literal[1] = Field(1, description="Manifest format version.")
    run: Run = Field(description="Name and folder of the run.")
    defaults: Defaults = Field(default_factory=Defaults, description="Inherited by every stage.")
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
    problems = check_references(loaded)
    if problems:
        raise ConfigError(problems)
    return loaded


def check_references(loaded: Loaded) -> list[str]:
    """Cross-stage and cross-file checks the schema cannot express."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    base = loaded.file.parent
    for i, stage in enumerate(loaded.manifest.stages):
        if stage.name in seen:
            problems.append(f"{loaded.where(('stages', i, 'name'))}: duplicate stage name '{stage.name}'")
        for section in ("init", "tokenizer"):
            ref = getattr(stage, section, None)
            if ref is None or ref.from_ is None:
                continue
            where = loaded.where(("stages", i, section, "from"))
            later = [s.name for s in loaded.manifest.stages[i:]]
            if ref.from_ not in seen:
                hint = "it comes later; stages run in order" if ref.from_ in later else f"known: {', '.join(seen) or 'none'}"
                problems.append(f"{where}: unknown earlier stage '{ref.from_}'; {hint}")
            elif section == "init" and seen[ref.from_] == "tokenizer":
                problems.append(f"{where}: stage '{ref.from_}' is a tokenizer and has no model weights; use tokenizer.from")
        if isinstance(stage, ModelStage) and stage.tokenizer is None and stage.init.config is not None:
            problems.append(
                f"{loaded.where(('stages', i, 'init', 'config'))}: a model built from a config needs "
                "tokenizer.from or tokenizer.pretrained (its vocabulary size comes from the tokenizer)"
            )
        for key in ("train", "eval"):
            files = getattr(stage.data, key)
            for j, name in enumerate([files] if isinstance(files, str) else files or []):
                path = ("stages", i, "data", key) + ((j,) if isinstance(files, list) else ())
                if os.path.expanduser(os.path.expandvars(name)) != name:
                    # datasets expands $VAR and ~ in data file paths, where the manifest means them literally
                    problems.append(f"{loaded.where(path)}: {name!r}: $VAR and ~ are not allowed in data paths "
                                    "(the data loader would expand them)")
                elif not (base / name).is_file():
                    problems.append(f"{loaded.where(path)}: data file not found: {base / name}")
        seen[stage.name] = stage.kind
    return problems


def _line_key(message: str) -> tuple[int, str]:
    head = message.split(" ", 1)[0]
    line = head.rsplit(":", 1)[-1]
    return (int(line) if line.isdigit() else 0, message)


def _describe(err: dict[str, Any], data: Any, file: Path, lines: dict[Path_, int]) -> str:
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
    elif kind.startswith("literal_error"):
        msg = f"{msg}; got {err['input']!r}"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"{file}:{line_of(lines, path)} {dotted(path) or '<top>'}: {msg}"


def _data_path(data: Any, loc: tuple) -> Path_:
    """The pydantic error location as a path into the YAML data (drops union tags)."""
    if len(loc) > 2 and loc[0] == "stages" and isinstance(loc[1], int):
        loc = (*loc[:2], *loc[3:])  # stages[i].<kind tag>.key -> stages[i].key
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
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
