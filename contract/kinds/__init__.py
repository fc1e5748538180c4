"""The registry of stage kinds: every module in this package is one kind.

A kind module defines `STAGE`, its manifest model: a subclass of `StageBase` (or
`TrainingStage`) with a `kind: Literal["<kind>"]` field, its own options section
(`options_field`), its inputs (fields holding references) and what its output
gives later stages (`gives`). Its program is `stages/<kind>.py`, started as
`python -m stages.<kind>`. Nothing else in baton names a kind.
"""

from __future__ import annotations

import importlib
import pkgutil
import typing

from contract.sections import StageBase


def _discover() -> dict[str, type[StageBase]]:
    found: dict[str, type[StageBase]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        stage = importlib.import_module(f"{__name__}.{info.name}").STAGE
        (kind,) = typing.get_args(stage.model_fields["kind"].annotation)
        assert kind == info.name, f"contract/kinds/{info.name}.py declares kind {kind!r}"
        found[kind] = stage
    return found


KINDS: dict[str, type[StageBase]] = _discover()
