"""The run folder as both sides see it: where a stage's files live, which checkpoints count,
the exit codes, and the two files a stage reports through (result.json, error.json).

    <run>/stages/<name>/spec.json  ckpt/step00000200/COMPLETE  ckpt/LATEST  final/  result.json  error.json
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from contract.files import write_json

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2  # bad spec or input; the message says what and where
EXIT_GATE_STOPPED = 3  # the driver's: a stage failed its gate with on_fail stop; nothing after it ran
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a signal after a complete checkpoint; run again to resume

TAG = re.compile(r"step(\d{8})")
TRAIN_LOSSES = "train_losses.json"  # in final/ with eval.score_train: each training example's loss


def stage_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "stages" / name


def ckpt_dir(stage_folder: str | Path) -> Path:
    return Path(stage_folder, "ckpt")


def keep_when_done(stage_folder: str | Path, keep: str) -> None:
    """A done stage's ckpt/ as `checkpoint.keep_when_done` asks, once its result is recorded: all of it, the last
    complete checkpoint (and LATEST, which names it), or nothing. Never run before: a checkpoint is what resumes."""
    root = ckpt_dir(stage_folder)
    if keep == "all" or not root.is_dir():
        return
    if keep == "none":
        shutil.rmtree(root)
        return
    last = complete_tags(stage_folder)[-1:]  # with LATEST and DeepSpeed's zero_to_fp32.py beside it
    for path in root.iterdir():
        if path.is_dir() and path.name not in last and (TAG.fullmatch(path.name) or path.name == "universal"):
            shutil.rmtree(path)


def final_dir(stage_folder: str | Path) -> Path:
    return Path(stage_folder, "final")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = TAG.fullmatch(tag)
    if m is None:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step<8 digits>)")
    return int(m[1])


def complete_tags(stage_folder: str | Path) -> list[str]:
    """Tags of the checkpoints that have their COMPLETE marker, oldest first.

    A checkpoint counts only once COMPLETE exists (written after every rank's files);
    LATEST is a convenience for people: a stage killed between writing the two
    still resumes from the newer, complete checkpoint.
    """
    root = ckpt_dir(stage_folder)
    return sorted(p.parent.name for p in root.glob("step*/COMPLETE") if TAG.fullmatch(p.parent.name))


def newest_complete(stage_folder: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(tag, COMPLETE marker) of the newest complete checkpoint, or None.

    The marker holds step, samples consumed and the fingerprint the checkpoint was made with.
    """
    tags = complete_tags(stage_folder)
    if not tags:
        return None
    try:
        marker = json.loads((ckpt_dir(stage_folder) / tags[-1] / "COMPLETE").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return tags[-1], marker


def continues(marker: dict[str, Any], fingerprint: str, any_world: str | None) -> bool:
    """Whether a checkpoint (its COMPLETE marker) continues a stage with these fingerprints: made with the same
    settings, or, given `any_world` (checkpoint.on_world_size_change: resume), with the same settings but for
    the world size and batch shape."""
    return marker.get("fingerprint") == fingerprint or (
        any_world is not None and marker.get("fingerprint_any_world") == any_world)


def resumable(stage_folder: str | Path, fingerprint: str, any_world: str | None = None) -> str | None:
    """The newest complete checkpoint's tag if it `continues` a stage with these fingerprints."""
    found = newest_complete(stage_folder)
    return found[0] if found and continues(found[1], fingerprint, any_world) else None


# ----------------------------------------------------------------- what a stage reports


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Output(Report):
    path: str
    digest: str | None


class Result(Report):
    """result.json: written last of all by rank 0 when the stage is done."""

    status: Literal["done"] = "done"
    stage: str
    kind: str
    fingerprint: str
    steps: int
    samples: int
    output: Output
    metrics: dict[str, float | int | None]  # null: a value that was not finite
    time: float
    # eval.best: the step whose model final/ holds (`metrics` are its eval's), and the last step's eval beside it
    best_step: int | None = None
    last_metrics: dict[str, float | int | None] | None = None
    stopped_early: str | None = None  # why training ended before its last step (eval.patience)


class ChangedInput(Report):
    """An input folder or file whose content is not what the spec recorded (e.g. an upstream final/ damaged)."""

    key: str  # the spec's key, e.g. inputs.init
    path: str
    digest: str  # what the stage found there
    expected: str


class BadInput(Report):
    """error.json: the stage refused its spec or input, or found the disk full (torchrun turns every failure into
    exit 1)."""

    exit_code: Literal[2] = 2  # EXIT_BAD_INPUT
    message: str
    changed_input: ChangedInput | None = None  # the refusal was an input's digest: the launcher records the damage
    # a write found no space left (not an input problem): the stage's complete checkpoints stay and a rerun
    # resumes from the newest; the launcher puts back no previous output over them
    no_space: bool = False


def read_metrics(stage_folder: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, oldest first; [] without the file. A line cut short by a crash is skipped."""
    try:
        lines = Path(stage_folder, "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_result(stage_folder: str | Path, result: Result) -> None:
    write_json(Path(stage_folder, "result.json"), result.model_dump())


def read_result(stage_folder: str | Path, fingerprint: str) -> Result | None:
    """The stage's result if it finished with `fingerprint` (a result of other settings is not this stage's)."""
    result = _read(Path(stage_folder, "result.json"), Result)
    return result if result is not None and result.fingerprint == fingerprint else None


def write_bad_input(stage_folder: str | Path, message: str, changed_input: ChangedInput | None = None,
                    no_space: bool = False) -> None:
    write_json(Path(stage_folder, "error.json"),
               BadInput(message=message, changed_input=changed_input, no_space=no_space).model_dump())


def read_bad_input(stage_folder: str | Path) -> BadInput | None:
    return _read(Path(stage_folder, "error.json"), BadInput)


def _read(path: Path, model: type[Report]) -> Any:
    try:
        return model.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None
