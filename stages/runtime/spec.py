"""The stage's view of spec.json: `contract.spec.Spec`, read once at start-up, and the exit-2 error."""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import ValidationError

from contract.sections import Checkpoint, Eval, Train
from contract.spec import ContractError, Ref, Spec

__all__ = ["Diverged", "Ref", "Spec", "SpecError", "Training", "load", "training"]


class SpecError(ContractError):
    """Bad spec or input: the stage prints the message as one line and exits 2."""


def load(path: str) -> Spec:
    """The spec at `path`, checked against the contract: a launcher/stage mismatch fails here, naming the key."""
    try:
        return Spec.load(path)
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
        raise SpecError(f"{path}: {problems}") from None


class Diverged(SpecError):
    """Training produced a non-finite loss or weights: the stage stops with exit 2 and exports nothing."""


class Training(NamedTuple):
    train: Train
    checkpoint: Checkpoint
    eval: Eval
    deepspeed: dict[str, Any]


def training(spec: Spec) -> Training:
    """The sections only a training kind's spec has (null for e.g. tokenizer)."""
    if spec.train is None or spec.checkpoint is None or spec.eval is None or spec.deepspeed is None:
        raise SpecError(f"spec: kind {spec.kind} trains, but train, checkpoint, eval or deepspeed is null")
    return Training(spec.train, spec.checkpoint, spec.eval, spec.deepspeed)
