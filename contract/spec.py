"""spec.json: the one definition. `launcher.resolve` writes it, a stage reads it with `Spec.load`.

Every path is absolute and every value resolved: no "auto", no default left for the
stage to guess. docs/stage-contract.md shows an example.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract.fingerprint import BY_DIGEST, LEFT_OUT, UNLESS_DEFAULT, files_by_digest
from contract.sections import Adapter, Checkpoint, Curriculum, Eval, Precision, Train

SPEC_VERSION = 2
M = TypeVar("M", bound=BaseModel)


# What a tokenizer's ids mean beyond its vocabulary: a model continued with another tokenizer, or a teacher and its
# student, must agree on these too (the launcher checks local folders before launch, the stage again at start)
SPECIAL_TOKEN_IDS = ("pad_token_id", "mask_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id",
                     "unk_token_id")


def vocabulary(tokenizer: Any) -> str:
    """A digest of what a model's embedding rows mean: every token with its id, and the special tokens' ids (as the
    stage compares a tokenizer with a model's own, `stages.runtime.models.vocabulary_difference`); a prepare stage
    records it, and a stage reading its token ids compares its own tokenizer's."""
    what = [sorted(tokenizer.get_vocab().items()), [getattr(tokenizer, n, None) for n in SPECIAL_TOKEN_IDS]]
    return "sha256:" + hashlib.sha256(json.dumps(what).encode()).hexdigest()


class ContractError(Exception):
    """A spec that does not hold what its kind needs: the stage exits 2 with this message."""


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ref(Frozen):
    """A resolved input."""

    source: Literal["stage", "pretrained", "config"] = Field(
        description="stage: an earlier stage's final/; pretrained: a local folder or hub name; config: build anew"
    )
    stage: str | None = Field(None, description="source=stage: the stage that produced it")
    path: Annotated[str | None, BY_DIGEST] = Field(
        None, description="the folder (absolute) or hub name; null for source=config")
    digest: str | None = Field(None, description="of the folder's content; null for hub names and configs")
    config: dict[str, Any] | None = Field(None, description="source=config: AutoConfig.for_model(**config)")
    # left out of the fingerprint: `stage` and `digest` say what was read
    named: Annotated[str | None, LEFT_OUT] = Field(
        None, description="source=stage, when a decision handed on another stage's output: the stage the manifest "
        "names (`stage` is the retry attempt, variant or fallback read)")


class Hub(Frozen):
    name: str
    config: str | None
    train_split: str
    eval_split: str | None


class DataSpec(Frozen):
    train_files: Annotated[list[str], files_by_digest("train")]
    eval_files: Annotated[list[str], files_by_digest("eval")]
    format: Literal["json", "csv", "parquet", "text"] | None = Field(description="null with hub")
    hub: Hub | None
    text_field: str
    text_pair_field: str | None
    label_field: str
    labels: list[str] | None
    max_length: int
    digests: Annotated[dict[str, str], LEFT_OUT] = Field(
        description="file -> digest of every local data file the stage reads, those of its data sections too; "
        "they count as train_files and eval_files")


class SharedEvalSpec(DataSpec):
    """A shared eval set (the manifest's `evals:`): every stage whose model fits `task` is scored on its eval files
    at its end; the scores join the stage's metrics as `<set>/<metric>`."""

    task: Literal["classify", "text"] = Field(
        description="classify: a sequence classifier's accuracy, macro_f1 and eval_loss (labels as the model's "
        "own); text: a language model's eval_loss and perplexity under its own objective (masked or causal)")


# What a stage can report its metrics.jsonl records to (stages/runtime/trackers.py)
Tracker = Literal["tensorboard", "wandb", "mlflow"]


def default_report_to() -> list[Tracker]:
    return ["tensorboard"]


class WandbSettings(Frozen):
    """Weights & Biases: where the stages' runs go. Unset values fall to W&B's own environment (WANDB_PROJECT,
    WANDB_ENTITY …), then to baton's defaults."""

    project: str | None = Field(None, description="W&B project; default: WANDB_PROJECT, else the run's name.")
    entity: str | None = Field(None, description="W&B entity (user or team); default: WANDB_ENTITY, else W&B's "
                               "default entity.")


class MlflowSettings(Frozen):
    """MLflow: where the stages' runs go."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else "
                                     "MLflow's default.")
    experiment: str | None = Field(None, description="MLflow experiment; default: MLFLOW_EXPERIMENT_NAME, else the "
                                   "run's name.")


class Reporting(Frozen):
    """Where the stage reports its metrics besides metrics.jsonl (rank 0). Not part of the fingerprint."""

    to: list[Tracker] = Field(default_factory=default_report_to, description="the run's report_to")
    wandb: WandbSettings = Field(default_factory=WandbSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)


class Spec(Frozen):
    """A stage's spec.json. Its fingerprint hashes every field but those its marker leaves out
    (`contract.fingerprint`)."""

    spec_version: Literal[2]
    run_name: Annotated[str, LEFT_OUT]
    stage: Annotated[str, LEFT_OUT]
    kind: str
    stage_dir: Annotated[str, LEFT_OUT]
    cache_dir: Annotated[str, LEFT_OUT] = Field(
        description="shared by the run's stages: datasets cache, tokenized data")
    fingerprint: Annotated[str, LEFT_OUT] = Field(
        description="of the resolved settings and input digests; in every checkpoint")
    fingerprint_any_world: Annotated[str, LEFT_OUT] = Field(
        description="the fingerprint without the world size and batch shape; in every checkpoint")
    seed: int
    precision: Precision
    world_size: int = Field(description="processes the launcher starts; the stage checks it")
    inputs: dict[str, Ref | list[Ref]] = Field(description="the named inputs: init, tokenizer, …")
    data: DataSpec = Field(description="the stage's data: section; a kind that reads only sections of its own "
                           "(multitask) has none: no files, and digests listing the sections' files")
    sections: Annotated[dict[str, DataSpec], UNLESS_DEFAULT] = Field(
        default_factory=dict, description="a kind's further data sections by name (multitask: one per task)")
    train: Train | None = Field(description="null for kinds that do not train (tokenizer)")
    checkpoint: Annotated[Checkpoint | None, LEFT_OUT]  # saving checkpoints does not change what is trained
    eval: Eval | None
    options: dict[str, Any] = Field(description="the kind's own section; the kind module's model reads it")
    curriculum: Annotated[Curriculum | None, UNLESS_DEFAULT] = Field(
        None, description="the training stage's curriculum section as the manifest gives it; null: none")
    adapter: Annotated[Adapter | None, UNLESS_DEFAULT] = Field(
        None, description="the training stage's adapter section as the manifest gives it; null: full fine-tuning "
        "(an adapter continued from a stage is inputs.adapter)")
    deepspeed: dict[str, Any] | None = Field(description="the final DeepSpeed config; null where train is")
    shared_evals: Annotated[dict[str, SharedEvalSpec], UNLESS_DEFAULT] = Field(
        default_factory=dict, description="the run's shared eval sets this stage is scored on at its end, by name")
    reporting: Annotated[Reporting, LEFT_OUT] = Field(
        default_factory=Reporting, description="the run's report_to, wandb and mlflow: where rank 0 sends its "
        "metrics records; not part of the fingerprint")

    @model_validator(mode="after")
    def _batch(self) -> Spec:
        t = self.train
        if t is not None and t.global_batch_size != t.micro_batch_size * t.grad_accum * self.world_size:
            raise ValueError(f"train.global_batch_size {t.global_batch_size} != micro_batch_size "
                             f"{t.micro_batch_size} × grad_accum {t.grad_accum} × world_size {self.world_size}")
        if (t is None) != (self.deepspeed is None):
            raise ValueError("train and deepspeed are both set or both null")
        return self

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        """Raises OSError or pydantic's ValidationError (the stage turns both into exit 2)."""
        return cls.model_validate_json(Path(path).read_bytes())

    @property
    def any_world(self) -> str | None:
        """fingerprint_any_world where this stage may resume a checkpoint saved at another world size."""
        c = self.checkpoint
        return self.fingerprint_any_world if c is not None and c.on_world_size_change == "resume" else None

    def ref(self, name: str) -> Ref:
        """The input `name`, which this kind declares as a single reference."""
        value = self.inputs.get(name)
        if not isinstance(value, Ref):
            raise ContractError(f"spec inputs.{name}: missing or not a single reference (kind {self.kind})")
        return value

    def options_as(self, model: type[M]) -> M:
        """spec.options read by the kind module's options model."""
        return model.model_validate(self.options)
