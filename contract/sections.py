"""The manifest's building blocks that every kind shares: settings sections, references to inputs,
and the two stage shapes (`StageBase`, `TrainingStage`) that kind modules extend.

Defaults live here, in the models, and nowhere else. A section a stage writes overrides
`defaults:` field by field: only the fields the stage wrote count (pydantic's
`model_fields_set`), see `inherit`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[^/\x00-\x1f.][^/\x00-\x1f]*$"
Precision = Literal["fp32", "bf16", "fp16"]


def name_fits(value: str) -> str:
    """Names become folder and lock-file names: 255 bytes is the usual limit, and suffixes are added."""
    size = len(value.encode("utf-8"))
    if size > 100:
        raise ValueError(f"{size} bytes in UTF-8; at most 100 (the name becomes folder and file names)")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


S = TypeVar("S", bound=Strict)


def inherit(default: S, own: S) -> S:
    """`own` over `default`, field by field: the fields a stage wrote replace those of `defaults:`."""
    return default.model_copy(update={name: getattr(own, name) for name in own.model_fields_set})


class Problem(ValueError):
    """A model validator's complaint about one of its fields: error messages name `path` below the model."""

    def __init__(self, path: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.path = path


def exactly_one(model: BaseModel, *names: str) -> None:
    """Raise unless exactly one of the fields `names` is set (messages use the YAML spelling)."""
    given = [n.rstrip("_") for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        shown = ", ".join(n.rstrip("_") for n in names)
        raise ValueError(f"give exactly one of: {shown} (got {', '.join(given) or 'none'})")


# ----------------------------------------------------------------- where and how a stage runs


class Launcher(Strict):
    nproc_per_node: int = Field(1, ge=1, le=1024, strict=True,
                                description="Processes per node (GPUs per node; CPU ranks on a CPU); at most 1024.")
    nnodes: int = Field(1, ge=1, le=4096, strict=True,
                        description="Nodes. More than 1 needs the Slurm back-end; at most 4096.")


class DeepSpeed(Strict):
    config: str = Field(
        "zero2",
        description="A file of ds_configs/ by name (zero0, zero1, zero2, zero3, zero2_offload, zero3_offload) "
        "or a path to a DeepSpeed JSON config, relative to the manifest.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Merged key by key onto the config file (nested mappings merge); "
        "a stage's overrides merge onto those of defaults.",
    )


class Slurm(Strict):
    """sbatch settings for `baton submit`."""

    partition: str | None = Field(None, description="Partition (--partition).")
    account: str | None = Field(None, description="Account to charge (--account).")
    qos: str | None = Field(None, description="Quality of service (--qos).")
    constraint: str | None = Field(None, description="Node features (--constraint).")
    time: str | None = Field(None, description="Time limit, as sbatch takes it: minutes, HH:MM:SS or D-HH:MM:SS.")
    mem: str | None = Field(None, description="Memory per node (--mem), e.g. 64G.")
    cpus_per_task: int | None = Field(None, ge=1, strict=True,
                                      description="CPUs for each node's torchrun (--cpus-per-task).")
    gpus_per_node: int | None = Field(None, ge=0, strict=True,
                                      description="GPUs per node (--gpus-per-node); default none.")
    extra: dict[str, str | int | None] | None = Field(
        None, description="More sbatch flags: {flag: value}, or {flag: null} for a bare flag such as exclusive."
    )
    preamble: str | None = Field(
        None, description="A shell file (relative to the manifest) pasted into the job script before baton "
        "starts: module loads, environment activation."
    )
    signal_before_s: int = Field(120, ge=10, strict=True,
                                 description="Seconds before the time limit that Slurm warns the "
                                 "stage (USR1), so it checkpoints and requeues.")
    max_requeues: int = Field(3, ge=0, strict=True,
                              description="How often a preempted or timed-out stage requeues itself.")


# ----------------------------------------------------------------- what a stage reads


class Data(Strict):
    train: str | list[str] | None = Field(
        None, description="Training file(s), relative to the manifest: .json/.jsonl/.csv/.parquet/.txt."
    )
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
    labels: list[str] | None = Field(
        None, description="Label names in id order; default: sorted labels of the train split."
    )
    max_length: int = Field(128, ge=8, le=65536, strict=True, description="Tokens per example after truncation.")

    @model_validator(mode="after")
    def _source(self) -> Data:
        if (self.train is None) == (self.hub is None):
            raise ValueError("give exactly one of: train (local files) or hub (a datasets name)")
        if self.hub is not None and self.eval is not None:
            raise ValueError("with hub, name the evaluation split in eval_split instead of eval files")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise Problem(("labels",), "labels repeat")
        return self


class RefBase(Strict):
    """A named input: an earlier stage's final/, or a local folder (relative to the manifest) or hub name."""

    needs: ClassVar[str]  # what the referenced stage's output must hold: "model", "tokenizer"
    from_: str | None = Field(None, alias="from", description="An earlier stage whose final/ this input is.")
    pretrained: str | None = Field(None, description="A local folder (relative to the manifest) or a hub name.")


class ModelRef(RefBase):
    """Model weights: from an earlier stage, a folder or hub name, or built from a config."""

    needs: ClassVar[str] = "model"
    config: dict[str, Any] | None = Field(
        None, description="Build from scratch: AutoConfig.for_model(**config); needs model_type, e.g. bert."
    )

    @model_validator(mode="after")
    def _one(self) -> ModelRef:
        exactly_one(self, "from_", "pretrained", "config")
        if self.config is not None and not isinstance(self.config.get("model_type"), str):
            raise ValueError("config needs model_type (e.g. bert, roberta, gpt2, llama)")
        return self


class TokenizerRef(RefBase):
    needs: ClassVar[str] = "tokenizer"

    @model_validator(mode="after")
    def _one(self) -> TokenizerRef:
        exactly_one(self, "from_", "pretrained")
        return self


References = dict[str, RefBase | list[RefBase]]


# ----------------------------------------------------------------- how a stage trains


def _finite(model: BaseModel) -> None:
    for name, value in model:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: {value} is not a finite number")


class Train(Strict):
    max_steps: int | None = Field(None, gt=0, le=10**9, strict=True,
                                  description="Optimizer steps to train (or give epochs); at most 10^9.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (or give max_steps).")
    micro_batch_size: int = Field(8, ge=1, le=65536, strict=True,
                                  description="Examples per rank per forward pass; at most 65536.")
    grad_accum: int = Field(1, ge=1, le=65536, strict=True,
                            description="Micro-batches accumulated per optimizer step; at most 65536.")
    global_batch_size: int | None = Field(
        None, ge=1, strict=True, description="If given, must equal micro_batch_size × grad_accum × world size."
    )
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, le=10**9, strict=True, description="Linear warmup steps; at most 10^9.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    log_every: int = Field(10, ge=1, strict=True, description="Progress line and metrics record every N steps.")
    stop_after_nonfinite: int = Field(
        3, ge=1, le=1000, description="Stop the stage with an error (exit 2, nothing exported) after this many "
        "consecutive optimizer steps whose loss is NaN or infinite on any rank.",
    )

    @field_validator("epochs", "lr", "weight_decay", "max_grad_norm", "eps", "betas", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool) or isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
            raise ValueError(f"{value!r}: a number is expected, not a boolean")
        return value

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):  # False for NaN too
            raise ValueError(f"betas {list(value)}: each must be at least 0 and less than 1")
        return value

    @model_validator(mode="after")
    def _length(self) -> Train:
        exactly_one(self, "max_steps", "epochs")
        _finite(self)
        return self


class Checkpoint(Strict):
    every_steps: int | None = Field(
        None, gt=0, strict=True, description="Save a resumable checkpoint every N steps (also on a signal)."
    )
    keep_last: int = Field(2, ge=1, strict=True, description="Complete checkpoints to keep.")


class Eval(Strict):
    every_steps: int | None = Field(None, gt=0, strict=True, description="Evaluate every N steps.")
    at_end: bool = Field(True, description="Evaluate after the last step.")


# ----------------------------------------------------------------- stage shapes


class StageBase(Strict):
    """What every stage has. A kind module subclasses this (or TrainingStage) with its `kind` literal,
    its own options section and its inputs, and sets the class variables below."""

    gives: ClassVar[frozenset[str]]  # what final/ holds, for the inputs of later stages: "model", "tokenizer"
    options_field: ClassVar[str | None] = None  # the kind's own section, handed to the stage as spec.options
    one_process: ClassVar[bool] = False  # runs as a single process whatever launcher says

    kind: str = Field(description="The stage kind: a module of contract/kinds/.")  # a Literal in each kind
    name: str = Field(pattern=NAME_PATTERN, max_length=100,
                      description="Unique stage name; also its folder name. At most 100 bytes in UTF-8.")
    launcher: Launcher = Field(default_factory=Launcher, description="Overrides defaults.launcher, field by field.")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed, description="Overrides defaults.deepspeed.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, strict=True,
                             description="Overrides defaults.seed (0 to 2^32 - 1).")
    precision: Precision | None = Field(None, description="Overrides defaults.precision.")
    slurm: Slurm = Field(default_factory=Slurm, description="Overrides defaults.slurm, field by field.")
    data: Data = Field(description="What the stage reads.")

    @field_validator("name")
    @classmethod
    def _name_bytes(cls, value: str) -> str:
        return name_fits(value)

    def references(self) -> References:
        """The named inputs: every field holding a reference (or a list of them), by field name."""
        out: References = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, RefBase) or (
                isinstance(value, list) and value and all(isinstance(v, RefBase) for v in value)
            ):
                out[name] = value
        return out

    def options(self) -> dict[str, Any]:
        """The kind's own section as spec.options."""
        return getattr(self, self.options_field).model_dump() if self.options_field else {}


class TrainingStage(StageBase):
    """A stage that trains a model with DeepSpeed: init, tokenizer, train, checkpoint, eval."""

    gives: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer"})

    init: ModelRef = Field(description="Where the weights come from.")
    tokenizer: TokenizerRef | None = Field(None, description="Default: the tokenizer saved with the init model.")
    train: Train = Field(description="Optimisation settings.")
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, description="Resumable checkpoints.")
    eval: Eval = Field(default_factory=Eval, description="When to evaluate.")

    @model_validator(mode="after")
    def _vocabulary(self) -> TrainingStage:
        if self.tokenizer is None and self.init.config is not None:
            raise Problem(("init", "config"), "a model built from a config needs tokenizer.from or "
                          "tokenizer.pretrained "
                             "(its vocabulary size comes from the tokenizer)")
        return self

    def references(self) -> References:
        refs = super().references()
        if self.tokenizer is None:  # the tokenizer saved with the init model
            init = {"from": self.init.from_, "pretrained": self.init.pretrained}
            refs["tokenizer"] = TokenizerRef.model_validate(init)
        return refs
