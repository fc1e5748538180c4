"""The stage's view of spec.json: `contract.spec.Spec`, read once at start-up, a training kind's `TrainingSpec`,
and the exit-2 error."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from contract.sections import Checkpoint, Eval, Train
from contract.spec import ContractError, Ref, Spec

__all__ = ["Diverged", "Ref", "Spec", "SpecError", "TrainingSpec", "load"]


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


class TrainingSpec(Spec):
    """A training kind's spec: the sections only such a spec has (null for e.g. tokenizer) are there. Checked once
    as the stage starts (`entry.run_training`), so the runtime reads `spec.train.micro_batch_size` as it is."""

    train: Train
    checkpoint: Checkpoint
    eval: Eval
    deepspeed: dict[str, Any]

    @classmethod
    def of(cls, spec: Spec) -> TrainingSpec:
        """`spec` as a TrainingSpec (the same values, validated when it was loaded); exit 2 where a section is
        null."""
        if isinstance(spec, TrainingSpec):
            return spec
        if spec.train is None or spec.checkpoint is None or spec.eval is None or spec.deepspeed is None:
            raise SpecError(f"spec: kind {spec.kind} trains, but train, checkpoint, eval or deepspeed is null")
        return cls.model_construct(spec.model_fields_set, **dict(spec))
