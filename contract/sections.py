"""The manifest's building blocks that every kind shares: settings sections, references to inputs,
and the two stage shapes (`StageBase`, `TrainingStage`) that kind modules extend.

Defaults live here, in the models, and nowhere else. A section a stage writes overrides
`defaults:` field by field: only the fields the stage wrote count (pydantic's
`model_fields_set`), see `inherit`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from contract.fingerprint import LEFT_OUT, UNLESS_DEFAULT

BLOCK_SIZE = 128  # tokens per packed block of the causal-LM heads (clm, distill, teacher_logits) by default
# a folder and file name: no /, no control characters; not starting with . (hidden, or . and ..), - (read as an
# option by the commands a user types it into) or white space (so never blank)
NAME_PATTERN = r"^[^/\x00-\x1f.\-\s][^/\x00-\x1f]*$"
Precision = Literal["fp32", "bf16", "fp16"]


def name_fits(value: str) -> str:
    """Names become folder and lock-file names: 255 bytes is the usual limit, and suffixes are added."""
    size = len(value.encode("utf-8"))
    if size > 100:
        raise ValueError(f"{size} bytes in UTF-8; at most 100 (the name becomes folder and file names)")
    return value


def finite_number(value: Any) -> Any:
    """A before-validator's check of a number field: not a boolean (pydantic takes True for 1), not NaN or ±inf."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r}: a number is expected, not a boolean")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value}: not a finite number")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


S = TypeVar("S", bound=Strict)


def inherit(default: S, own: S) -> S:
    """`own` over `default`, field by field: the fields a stage wrote replace those of `defaults:`."""
    return default.model_copy(update={name: getattr(own, name) for name in own.model_fields_set})


class Problem(ValueError):
    """A model validator's complaint about one of its fields: error messages name `path` below the model."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
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
    nproc_per_node: int | Literal["auto"] = Field(
        1, description="Processes per node (GPUs per node; CPU ranks on a CPU), at most 1024; auto: one per GPU of "
        "the node (slurm.gpus_per_node under `baton submit`), 1 on a machine without GPUs.")
    nnodes: int = Field(1, ge=1, le=4096, strict=True,
                        description="Nodes. More than 1 needs the Slurm back-end; at most 4096.")

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> Any:
        """One message for both forms (pydantic's union would give one per form)."""
        if value == "auto" or (type(value) is int and 1 <= value <= 1024):
            return value
        if type(value) is int:
            raise ValueError(f"{value}: should be greater than or equal to 1 and less than or equal to 1024, or auto")
        raise ValueError(f"{value!r:.40}: should be a valid integer (processes, 1 to 1024) or auto")


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


# sbatch flags that baton sets in every stage's job script, which the stage's contract depends on (one torchrun per
# node, the log a requeued job appends to, the USR1 warning, the afterok chain): slurm.extra may not set them
SBATCH_OWN = frozenset({"job-name", "nodes", "ntasks-per-node", "output", "error", "open-mode", "requeue", "no-requeue",
                        "signal", "kill-on-invalid-dep", "dependency", "wrap"})
SBATCH_FLAG = re.compile(r"^[a-z][a-z0-9-]*$")


def sbatch_extra_problems(extra: dict[str, Any]) -> dict[str, str]:
    """{flag: problem} for the flags of slurm.extra (names only: the job script quotes values whatever they hold)."""
    problems = {}
    for flag in extra:
        if not SBATCH_FLAG.match(flag):
            problems[flag] = f"{flag!r} is not an sbatch long option name (lowercase letters, digits, dashes)"
        elif flag in SBATCH_OWN:
            problems[flag] = f"{flag!r} is set by baton and cannot be overridden"
    return problems


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

    @model_validator(mode="after")
    def _extra_flags(self) -> Slurm:
        problems = sbatch_extra_problems(self.extra or {})
        if problems:  # named at the first bad flag; the message lists them all
            raise Problem(("extra", next(iter(problems))), "; ".join(problems.values()))
        return self


# ----------------------------------------------------------------- what a stage reads


class Data(Strict):
    from_: str | None = Field(
        None, alias="from", description="An earlier prepare stage whose tokenized corpus (train and eval splits) "
        "the stage reads, instead of train/eval files or hub; kinds that read prepared data: clm.")
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

    reads_train: ClassVar[bool] = True  # a training stage's data; an eval-only kind's (ensemble) is a subclass

    @model_validator(mode="after")
    def _source(self) -> Data:
        if self.from_ is not None:
            given = [k for k in ("train", "eval", "hub") if getattr(self, k) is not None]
            if given:
                raise Problem((given[0],), "data.from reads an earlier prepare stage's splits: give no "
                              "train, eval or hub beside it")
            return self
        if self.reads_train and (self.train is None) == (self.hub is None):
            raise ValueError("give exactly one of: train (local files), hub (a datasets name) or from (a "
                             "prepare stage)")
        if self.train == []:
            raise Problem(("train",), "no files: give at least one training file")
        if self.hub is not None and self.eval is not None:
            raise ValueError("with hub, name the evaluation split in eval_split instead of eval files")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise Problem(("labels",), "labels repeat")
        return self


class TransferData(Data):
    """Training rows without labels (a distill stage's transfer set): text only, nothing to score."""

    @model_validator(mode="after")
    def _text_only(self) -> TransferData:
        for key, why in (("eval", "a transfer set is trained on, never scored: the stage's data.eval scores it"),
                         ("eval_split", "a transfer set is trained on, never scored: the stage's data scores it"),
                         ("labels", "a transfer set's rows have no labels: the teacher's logits are their targets"),
                         ("label_field", "a transfer set's rows have no labels: the teacher's logits are their "
                          "targets")):
            if key in self.model_fields_set and getattr(self, key) is not None:
                raise Problem((key,), why)
        return self


class EvalData(Data):
    """Data read only for scoring (an ensemble's, a shared eval set's): data.eval files, or hub with eval_split."""

    reads_train: ClassVar[bool] = False

    @model_validator(mode="after")
    def _eval_only(self) -> EvalData:
        if self.train is not None:
            raise Problem(("train",), "this data is only scored, never trained on: give the files as eval")
        if self.eval is None and self.hub is None:
            raise ValueError("give eval (local files) or hub with eval_split")
        if self.hub is not None and self.eval_split is None:
            raise Problem(("hub",), "only the eval split is read: give eval_split")
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


class PreparedRef(RefBase):
    """A corpus an earlier prepare stage tokenized (a stage's `data: {from: …}`). Only `from`."""

    needs: ClassVar[str] = "prepared"

    @model_validator(mode="after")
    def _one(self) -> PreparedRef:
        exactly_one(self, "from_")
        return self


class RowsRef(RefBase):
    """Values an earlier stage wrote per row of its training data: the stage that reads them must train on the same
    data (the same files), and where `same_rows`, on rows made alike (`StageBase.training_rows`). Only `from`."""

    holds: ClassVar[str]  # what the values are, for messages
    same_rows: ClassVar[bool] = False

    @model_validator(mode="after")
    def _one(self) -> RowsRef:
        exactly_one(self, "from_")
        return self


class TrainLossesRef(RowsRef):
    """An earlier stage's per-example training losses (its eval.score_train): final/train_losses.json."""

    needs: ClassVar[str] = "train_losses"
    holds: ClassVar[str] = "losses"


References = dict[str, RefBase | list[RefBase]]


class DataSection(NamedTuple):
    """One data section a stage reads: its `data:`, or one its kind adds (multitask: each task's `data:`)."""

    name: str | None  # None: the stage's own data: (spec.data); else its key in spec.sections
    path: tuple[str | int, ...]  # where it is below the stage in the manifest, for messages
    data: Data
    head: str | None = None  # what its rows train or score, where not the stage's own head (multitask's tasks)
    unlabelled: bool = False  # its rows need no labels, whatever the head (distill's transfer set)


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
    log_every: Annotated[int, LEFT_OUT] = Field(10, ge=1, strict=True,
                                                description="Progress line and metrics record every N steps.")
    stop_after_nonfinite: int = Field(
        3, ge=1, le=1000, description="Stop the stage with an error (exit 2, nothing exported) after this many "
        "consecutive optimizer steps whose loss is NaN or infinite on any rank.",
    )
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1, description="Layer-wise learning-rate decay: layer group g of G (embeddings 0, each "
        "transformer layer, head G-1) trains at lr × layer_lr_decay^(G-1-g); 1: one rate for all. Needs a "
        "BERT- or GPT-like transformers model.",
    )

    @field_validator("epochs", "lr", "weight_decay", "max_grad_norm", "eps", "betas", "layer_lr_decay", mode="before")
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
    keep_when_done: Annotated[Literal["all", "last", "none"], LEFT_OUT] = Field(
        "all", description="What ckpt/ keeps once the stage is done (final/ is its hand-off): all (keep_last), the "
        "last (to resume training it further at another world size), or none.")
    on_world_size_change: Literal["restart", "resume"] = Field(
        "restart",
        description="When only the world size (nproc_per_node × nnodes) or the batch shape (micro_batch_size, "
                    "grad_accum) changed: restart the stage, or resume its checkpoint through DeepSpeed's "
                    "universal checkpoint at the same sample, and keep a done stage.",
    )


class Best(Strict):
    """Which eval's model the stage hands on: the one with the largest (max) or smallest (min) value of a metric."""

    metric: str = Field(description="A metric of the stage's own eval (eval_loss, accuracy …), as its result names "
                        "it (multitask: <task>/<metric>).")
    mode: Literal["max", "min"] = Field(description="max: larger is better (accuracy); min: smaller is (eval_loss).")


class Eval(Strict):
    every_steps: int | None = Field(None, gt=0, strict=True, description="Evaluate every N steps.")
    at_end: bool = Field(True, description="Evaluate after the last step.")
    score_train: Annotated[bool, UNLESS_DEFAULT] = Field(
        False, description="After training, write each training example's loss under the final model to "
        "final/train_losses.json, for a later stage's curriculum (difficulty: {loss_of: <this stage>}).",
    )
    best: Annotated[Best | None, UNLESS_DEFAULT] = Field(
        None, description="final/ is the model of the best eval (every every_steps, and the last step's with "
        "at_end) by this metric; the stage's metrics are that eval's, the last step's are kept beside them. "
        "Default: the last step's model.",
    )
    patience: Annotated[int | None, UNLESS_DEFAULT] = Field(
        None, ge=1, le=10**6, strict=True, description="Early stopping: end the stage once this many evals in a "
        "row have not beaten eval.best's. Default: train to the end.",
    )

    @model_validator(mode="after")
    def _selection(self) -> Eval:
        if self.best is not None and self.every_steps is None:
            raise Problem(("best",), "choosing the best eval needs evals during training: give eval.every_steps")
        if self.patience is not None and self.best is None:
            raise Problem(("patience",), "early stopping counts evals that did not beat the best: give eval.best "
                          "{metric: …, mode: max|min}")
        if self.best is not None and self.score_train:
            raise Problem(("score_train",), "score_train scores the last step's model, and eval.best hands on "
                          "another: use one or the other")
        return self


# ----------------------------------------------------------------- adapters


class Adapter(Strict):
    """Train a low-rank adapter (LoRA, through peft) instead of every weight: the base model stays frozen, only the
    adapter's matrices (and `modules_to_save`) train, and only they are in the optimizer. final/adapter/ holds the
    adapter (`PeftModel.from_pretrained`); final/ the merged model, unless `merge: false`."""

    SHAPE: ClassVar[tuple[str, ...]] = ("r", "alpha", "dropout", "target_modules", "modules_to_save")

    type: Literal["lora"] = Field("lora", description="The adapter: lora (peft's LoraConfig).")
    from_: str | None = Field(
        None, alias="from", description="Continue the adapter of an earlier stage (one with merge: false) on the "
        "same base model (init); its r, alpha, dropout, target_modules and modules_to_save come with it.")
    r: int = Field(8, ge=1, le=4096, strict=True, description="Rank of the low-rank update.")
    alpha: float = Field(16.0, gt=0, description="Scaling: the update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="Names (or name endings) of the linear layers that get an adapter, e.g. "
        "[q_proj, v_proj]; [all-linear]: every linear layer but the output head. Default: peft's choice for the "
        "model type.")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full beside the adapter and saved with it, e.g. [classifier] for a "
        "new classification head (which LoRA alone would leave random).")
    merge: bool = Field(True, description="final/ also holds the model with the adapter merged in, in the ordinary "
                        "from_pretrained layout; false: the adapter (and tokenizer) only, for a later stage's "
                        "adapter.from.")
    quantize: Literal["4bit"] | None = Field(
        None, description="QLoRA: load the frozen base in 4 bits (bitsandbytes NF4); needs a CUDA device.")

    @field_validator("alpha", "dropout", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"{value!r}: a number is expected, not a boolean")
        return value


class AdapterRef(RefBase):
    """An earlier stage's adapter (adapter.from): its final/adapter/."""

    needs: ClassVar[str] = "adapter"

    @model_validator(mode="after")
    def _one(self) -> AdapterRef:
        exactly_one(self, "from_")
        return self


# ----------------------------------------------------------------- layer-wise training


class Unfreeze(Strict):
    """Gradual unfreezing (ULMFiT): the top `start` layer groups train first (the head is the top group,
    then the last transformer layer …, the embeddings the bottom one), one more group joins every
    `every_steps` steps, until all train. The phase is a function of the step alone."""

    start: int = Field(1, ge=1, le=100_000, strict=True,
                       description="Layer groups trained from step 0, counted from the top (1: the head alone).")
    every_steps: int = Field(ge=1, le=10**9, strict=True,
                             description="Steps between two unfreezings: one more group trains from each multiple.")


class Layerwise(Strict):
    """Layer-wise options of a training kind (train.layer_lr_decay is every training kind's)."""

    unfreeze: Unfreeze | None = Field(None, description="Gradual unfreezing; default: every layer trains.")


# ----------------------------------------------------------------- curriculum


class Difficulty(Strict):
    """What makes a training example hard, for curriculum.order easy_first; larger is harder, ties by row order."""

    by: Literal["length"] | None = Field(None, description="length: tokens of the example after tokenization.")
    column: str | None = Field(None, description="A numeric column of the training data (json, jsonl, csv, "
                               "parquet): its value per example.")
    loss_of: str | None = Field(None, description="An earlier stage with eval.score_train that trained on the same "
                                "training data: each example's loss under its final model.")

    @model_validator(mode="after")
    def _one(self) -> Difficulty:
        exactly_one(self, "by", "column", "loss_of")
        return self


class Phase(Strict):
    """One phase of a curriculum: the steps it covers, the share of the corpus it draws from, its length cap."""

    until_step: int | None = Field(
        None, gt=0, le=10**9, strict=True, description="The phase's last optimizer step (steps are counted from "
        "1; the next phase begins at until_step + 1); null, and only so, for the last phase, which runs to the end.",
    )
    data_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of the training examples the phase draws from: the first "
        "round(data_fraction × N) (at least 1) of the curriculum's ranking of the corpus.",
    )
    max_length: int | None = Field(
        None, ge=8, le=65536, strict=True, description="Tokens per example in this phase, cut at batch time "
        "(the final special token is kept); clm: the first max_length tokens of each block. Null: the full length.",
    )

    @field_validator("data_fraction", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"{value!r}: a number is expected, not a boolean")
        return value


class Curriculum(Strict):
    """Phases that grow the share of the corpus drawn from and the sequence length, easy examples first.

    Which examples step s draws is a function of (seed, s, the global batch, the corpus) alone, so a
    resumed stage goes on with the same draws."""

    phases: list[Phase] = Field(min_length=1, max_length=1000, description="In order of until_step; the last one "
                                "has no until_step.")
    order: Literal["random", "easy_first"] = Field(
        "random", description="How the corpus is ranked for data_fraction: random (a fixed permutation from the "
        "seed) or easy_first (by difficulty, easiest first). Within a phase its pool is always drawn in a "
        "shuffled order, one pass (epoch) of the pool after another.",
    )
    difficulty: Difficulty | None = Field(None, description="What easy_first ranks by; required with it.")
    log_draws: Annotated[bool, LEFT_OUT] = Field(
        False, description="Write every step's drawn example indices (all ranks) to metrics.jsonl as a `draw` record: "
        "for tests and small runs.")

    @model_validator(mode="after")
    def _phases(self) -> Curriculum:
        last = len(self.phases) - 1
        previous = 0
        for k, phase in enumerate(self.phases):
            if k < last and phase.until_step is None:
                raise Problem(("phases", k), "until_step is missing: every phase but the last needs one")
            if k == last and phase.until_step is not None:
                raise Problem(("phases", k, "until_step"), "the last phase runs to the end of training: "
                              "leave out its until_step")
            if phase.until_step is not None:
                if phase.until_step <= previous:
                    raise Problem(("phases", k, "until_step"), f"{phase.until_step} is not after the previous "
                                  f"phase's until_step {previous}; phases are in order of until_step")
                previous = phase.until_step
        if self.order == "easy_first" and self.difficulty is None:
            raise Problem(("order",), "easy_first needs difficulty: {by: length}, {column: <name>} or "
                          "{loss_of: <stage>}")
        if self.order == "random" and self.difficulty is not None:
            raise Problem(("difficulty",), "difficulty is used by order: easy_first only (order is random)")
        if self.order == "easy_first" and all(p.data_fraction == 1 for p in self.phases):
            raise Problem(("order",), "easy_first orders nothing when every phase has data_fraction 1 "
                          "(each phase shuffles its whole pool); give the early phases a smaller data_fraction")
        return self


# ----------------------------------------------------------------- decisions after a stage

NOT_OVERRIDDEN = ("name", "kind", "gate", "variants")  # keys an override may not touch


def _dotted_keys(value: dict[str, Any]) -> dict[str, Any]:
    for key in value:
        if not key or key.split(".")[0] in NOT_OVERRIDDEN:
            raise ValueError(f"{key!r}: an override's key is a dotted path into the stage, e.g. train.lr; "
                             f"not {', '.join(NOT_OVERRIDDEN)}")
    return value


# dotted keys into the stage ("train.lr") -> the value that replaces what is there
Overrides = Annotated[dict[str, Any], AfterValidator(_dotted_keys)]


class Gate(Strict):
    """Conditions on the stage's metrics, checked when it ends, and what a failure does."""

    require: list[str] = Field(
        min_length=1, max_length=100, description="Conditions that must all hold, e.g. `accuracy >= 0.80`, "
        "`eval_loss <= upstream.eval_loss`, `accuracy >= teacher.accuracy - 0.02`: metrics, numbers, + - * / and "
        "parentheses, one comparison (< <= > >= == !=). A metric is the stage's own, or owner.metric where owner is "
        "upstream (the stage its model came from), one of its inputs (teacher …) or an earlier stage.")
    on_fail: Literal["stop", "retry", "fallback"] = Field(
        "stop", description="stop: the run ends (exit 3) and nothing downstream runs; retry: run the stage again with "
        "the next of `retries`; fallback: hand on the output of stage `fallback` instead of this one's.")
    retries: list[Overrides] | None = Field(
        None, min_length=1, max_length=20, description="on_fail retry: one mapping of overrides per further attempt "
        "({train.lr: 2.5e-5, train.max_steps: 400}, {seed: 7} …); each attempt runs in its own folder "
        "<stage>@2, <stage>@3 … and all are kept. When the last one fails too: fallback if given, else stop.")
    fallback: str | None = Field(
        None, description="An earlier stage whose output is handed on instead when the gate fails (on_fail "
        "fallback, or after the last retry).")

    @field_validator("require", mode="before", json_schema_input_type=str | list[str])  # one condition, or a list
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _action(self) -> Gate:
        if self.on_fail == "retry" and not self.retries:
            raise Problem(("on_fail",), "retry needs retries: one mapping of overrides per further attempt")
        if self.on_fail != "retry" and self.retries:
            raise Problem(("retries",), f"retries are for on_fail: retry (on_fail is {self.on_fail})")
        if self.on_fail == "fallback" and self.fallback is None:
            raise Problem(("on_fail",), "fallback needs fallback: the earlier stage whose output goes on instead")
        if self.on_fail == "stop" and self.fallback is not None:
            raise Problem(("fallback",), "on_fail is stop: a fallback is used with on_fail fallback or retry")
        return self


class Select(Strict):
    """Which variant goes on: the one with the largest (max) or smallest (min) value of a metric."""

    max: str | None = Field(None, description="A metric of the stage; the variant with the largest value wins.")
    min: str | None = Field(None, description="A metric of the stage; the variant with the smallest value wins.")

    @model_validator(mode="after")
    def _one(self) -> Select:
        exactly_one(self, "max", "min")
        return self

    @property
    def metric(self) -> str:
        return self.max or self.min or ""


class Variants(Strict):
    """Run the stage several times with other settings; the best by `select` is handed on."""

    grid: Annotated[dict[str, list[Any]], AfterValidator(_dotted_keys)] | None = Field(
        None, description="Overrides to combine, each key with its values: {train.lr: [1e-4, 5e-5], seed: [1, 2]} "
        "runs 4 variants (the product, in order).")
    each: list[Overrides] | None = Field(
        None, min_length=1, description="Or the variants one by one: [{train.lr: 1e-4}, {train.lr: 5e-5, "
        "train.max_steps: 400}].")
    select: Select = Field(description="{max: <metric>} or {min: <metric>}: the variant handed on.")

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        for key, values in (value or {}).items():
            if not values:
                raise ValueError(f"{key}: give at least one value")
        return value

    @model_validator(mode="after")
    def _one(self) -> Variants:
        exactly_one(self, "grid", "each")
        # the product of the sizes, not the expanded grid: a few lines of manifest can ask for 10^8 variants
        count = len(self.each) if self.each is not None else math.prod(len(v) for v in (self.grid or {}).values())
        if count > 64:
            raise ValueError(f"{count} variants; at most 64")
        return self

    def overrides(self) -> list[dict[str, Any]]:
        """Each variant's overrides, in order."""
        if self.each is not None:
            return list(self.each)
        out: list[dict[str, Any]] = [{}]
        for key, values in (self.grid or {}).items():
            out = [o | {key: v} for o in out for v in values]
        return out


Head = str  # a head's name: a module of contract/heads/


# ----------------------------------------------------------------- stage shapes


class StageBase(Strict):
    """What every stage has. A kind module subclasses this (or TrainingStage) with its `kind` literal,
    its own options section and its inputs, and sets the class variables below."""

    gives: ClassVar[frozenset[str]]  # what final/ holds, for the inputs of later stages: "model", "tokenizer"
    options_field: ClassVar[str | None] = None  # the kind's own section, handed to the stage as spec.options
    one_process: ClassVar[bool] = False  # runs as a single process whatever launcher says
    # pairs of inputs that must read the same token ids (a model and its tokenizer, a teacher and its student's
    # tokenizer): compared before launch where both are local folders that hold a tokenizer
    same_vocabulary: ClassVar[tuple[tuple[str, str], ...]] = ()
    # the input (its first item, for a list) whose folder the `tokenizer` input defaults to, when not written
    tokenizer_from: ClassVar[str | None] = None
    head: ClassVar[Head | None] = None  # the head of the model final/ holds, when the kind alone says it
    # where a classifier's rows without labels can go instead, said where validate finds a row that lacks one
    unlabelled_rows: ClassVar[str | None] = None
    reads_prepared: ClassVar[bool] = False  # its data: may be {from: <a prepare stage>}

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
    gate: Gate | None = Field(None, description="Conditions on the stage's metrics when it ends, and what a "
                              "failure does (stop, retry, fallback). Default: none.")
    variants: Variants | None = Field(None, description="Run the stage once per variant (a grid of overrides) "
                                      "and hand on the best by a metric. Default: none.")

    @field_validator("name")
    @classmethod
    def _name_bytes(cls, value: str) -> str:
        if "@" in value:
            raise ValueError(f"{value!r}: @ is not allowed in stage names (it names a stage's retry attempts and "
                             "variants: <stage>@2, <stage>@v1)")
        return name_fits(value)

    @model_validator(mode="after")
    def _prepared(self) -> StageBase:
        if self.data is not None and self.data.from_ is not None and not self.reads_prepared:
            raise Problem(("data", "from"), f"kind {self.kind} does not read prepared data; give train files or "
                          "hub (kinds that read a prepare stage's output: "
                          + ", ".join(self._prepared_kinds()) + ")")
        return self

    @staticmethod
    def _prepared_kinds() -> list[str]:
        from contract.kinds import KINDS  # the kind modules import this one

        return sorted(kind for kind, stage in KINDS.items() if stage.reads_prepared)

    @model_validator(mode="after")
    def _decisions(self) -> StageBase:
        if self.variants is not None and self.gate is not None and self.gate.on_fail == "retry":
            raise Problem(("gate", "on_fail"), "a stage with variants is not retried: the gate checks the "
                          "selected variant; use on_fail stop or fallback")
        return self

    def model_head(self) -> Head | None:
        """The head of the model this stage hands on (what a shared eval set can score), or None."""
        return self.head

    def metric_names(self) -> frozenset[str]:
        """The metrics the stage reports in its result (what a gate or a selection may name)."""
        head = self.model_head()
        from contract.heads import HEADS  # the heads' modules import these sections

        return frozenset(HEADS[head].metrics) if head and self.scored() else frozenset()

    def scored(self) -> bool:
        """Whether the stage has eval data to report its head's metrics on."""
        data = self.data
        # prepared data: whether its prepare stage had eval data shows at run time; a gate on an eval metric is let be
        return data is not None and (data.eval is not None or data.from_ is not None
                                     or (data.hub is not None and data.eval_split is not None))

    def references(self) -> References:
        """The named inputs: every field holding a reference (or a list of them), by field name; and the tokenizer
        saved with input `tokenizer_from` where the stage gives none."""
        out: References = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, RefBase) or (
                isinstance(value, list) and value and all(isinstance(v, RefBase) for v in value)
            ):
                out[name] = value
        if self.data is not None and self.data.from_ is not None:
            out["data"] = PreparedRef.model_validate({"from": self.data.from_})
        if self.tokenizer_from is not None and getattr(self, "tokenizer", None) is None:
            source = getattr(self, self.tokenizer_from)
            source = source[0] if isinstance(source, list) else source
            out["tokenizer"] = TokenizerRef.model_validate({"from": source.from_, "pretrained": source.pretrained})
        return out

    def outputs(self) -> frozenset[str]:
        """What this stage's final/ holds for the inputs of later stages: `gives`, unless a kind's output
        depends on its settings (ensemble: a logits ensemble is no plain model)."""
        return self.gives

    def reference_key(self, name: str, index: int | None) -> tuple[str | int, ...]:
        """Where input `name` (item `index` of a list) names its earlier stage, below the stage in the manifest."""
        return (name, *(() if index is None else (index,)), "from")

    def training_rows(self) -> dict[str, Any]:
        """What, besides its training data, decides the rows of its training split (a packed block's size, a
        classifier's truncation): values stored per row (`RowsRef.same_rows`) fit only rows made alike."""
        return {}

    def options(self) -> dict[str, Any]:
        """The kind's own section as spec.options."""
        return getattr(self, self.options_field).model_dump() if self.options_field else {}

    def data_sections(self) -> list[DataSection]:
        """Every data section the stage reads: its `data:`. A kind that reads more (or other) sections overrides
        this; resolve checks and resolves each one (files, format, digests) into spec.data or spec.sections."""
        return [DataSection(None, ("data",), self.data)]


class TrainingStage(StageBase):
    """A stage that trains a model with DeepSpeed: init, tokenizer, train, checkpoint, eval."""

    gives: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer"})
    same_vocabulary: ClassVar[tuple[tuple[str, str], ...]] = (("init", "tokenizer"),)
    tokenizer_from: ClassVar[str | None] = "init"
    scores_train: ClassVar[bool] = False  # the stage program writes eval.score_train's per-example losses

    init: ModelRef = Field(description="Where the weights come from.")
    tokenizer: TokenizerRef | None = Field(None, description="Default: the tokenizer saved with the init model.")
    train: Train = Field(description="Optimisation settings.")
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, description="Resumable checkpoints.")
    eval: Eval = Field(default_factory=Eval, description="When to evaluate.")
    curriculum: Curriculum | None = Field(None, description="Curriculum phases: a growing share of the corpus, a "
                                          "sequence-length warm-up, easy examples first. Default: none.")
    adapter: Adapter | None = Field(None, description="Train a LoRA adapter on the frozen init model instead of "
                                    "every weight. Default: none (full fine-tuning).")

    @model_validator(mode="after")
    def _adapter(self) -> TrainingStage:
        if self.adapter is None:
            return self
        if self.train.layer_lr_decay != 1:
            raise Problem(("train", "layer_lr_decay"), "the layer groups of layer_lr_decay are the full model's; "
                          "with an adapter only the adapter trains: leave layer_lr_decay out")
        if self.options().get("unfreeze") is not None:
            raise Problem((self.options_field or "", "unfreeze"), "gradual unfreezing trains the full model's layer "
                          "groups; with an adapter only the adapter trains: leave unfreeze out")
        written = [n for n in self.adapter.SHAPE if n in self.adapter.model_fields_set]
        if self.adapter.from_ is not None and written:  # here, not in Adapter: spec.json writes every field
            raise Problem(("adapter", written[0]), f"the adapter continued from stage '{self.adapter.from_}' brings "
                          f"its own {', '.join(self.adapter.SHAPE)}; leave {', '.join(written)} out")
        if self.adapter.from_ is not None and self.init.from_ is None and self.init.pretrained is None:
            raise Problem(("adapter", "from"), "an adapter is continued on the base model it was trained on: give "
                          "init.from or init.pretrained, as the stage it comes from does")
        return self

    @model_validator(mode="after")
    def _curriculum(self) -> TrainingStage:
        c = self.curriculum
        if c is None:
            return self
        block = self.options().get("block_size")  # a kind that packs fixed blocks (clm): data.max_length does not apply
        limit, name = (block, f"{self.options_field}.block_size") if block else (self.data.max_length,
                                                                                  "data.max_length")
        for k, phase in enumerate(c.phases):
            if phase.max_length is not None and phase.max_length > limit:
                raise Problem(("curriculum", "phases", k, "max_length"),
                              f"{phase.max_length} is more than {name} {limit}")
            if phase.until_step is not None and self.train.max_steps is not None \
                    and phase.until_step >= self.train.max_steps:
                raise Problem(("curriculum", "phases", k, "until_step"),
                              f"{phase.until_step}: training stops at train.max_steps {self.train.max_steps}, "
                              "so the phases after this one would never run")
        if block and c.difficulty is not None:
            raise Problem(("curriculum", "difficulty"), f"kind {self.kind} packs documents into blocks, which have "
                          "no length or column of their own; use order: random")
        return self

    @model_validator(mode="after")
    def _score_train(self) -> TrainingStage:
        if self.eval.score_train and not self.scores_train:
            raise Problem(("eval", "score_train"), f"kind {self.kind} does not score its training examples "
                          "(per-example losses need one loss per row of the training data)")
        return self

    @model_validator(mode="after")
    def _best(self) -> TrainingStage:
        best = self.eval.best
        if best is None:
            return self
        names = self.metric_names()
        if not names:
            raise Problem(("eval", "best"), "the stage has no eval data (data.eval) to choose the best step by")
        if best.metric not in names:
            raise Problem(("eval", "best", "metric"), f"{best.metric!r} is not a metric of this stage; "
                          f"known: {', '.join(sorted(names))}")
        return self

    @model_validator(mode="after")
    def _vocabulary(self) -> TrainingStage:
        if self.tokenizer is None and self.init.config is not None:
            raise Problem(("init", "config"), "a model built from a config needs tokenizer.from or "
                          "tokenizer.pretrained "
                             "(its vocabulary size comes from the tokenizer)")
        return self

    def references(self) -> References:
        refs = super().references()
        difficulty = self.curriculum.difficulty if self.curriculum else None
        if difficulty is not None and difficulty.loss_of is not None:
            refs["difficulty"] = TrainLossesRef.model_validate({"from": difficulty.loss_of})
        if self.adapter is not None and self.adapter.from_ is not None:
            refs["adapter"] = AdapterRef.model_validate({"from": self.adapter.from_})
        return refs

    def reference_key(self, name: str, index: int | None) -> tuple[str | int, ...]:
        if name == "difficulty":
            return ("curriculum", "difficulty", "loss_of")
        return ("adapter", "from") if name == "adapter" else super().reference_key(name, index)

    def outputs(self) -> frozenset[str]:
        out = self.gives | ({"train_losses"} if self.eval.score_train else set())
        if self.adapter is not None:  # merge: false hands on the adapter alone, with the tokenizer
            out = (out | {"adapter"}) - (set() if self.adapter.merge else {"model"})
        return out
