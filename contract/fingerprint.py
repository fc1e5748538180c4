"""What a stage's fingerprint counts, declared on the fields of spec.json's models (`contract.spec`, and the
sections it shares with the manifest): `fingerprinted(spec)` is what the launcher hashes and records.

A field counts as it is, unless its type carries one of these markers:

    stage_dir: Annotated[str, LEFT_OUT]                       # never counts
    sections: Annotated[dict[str, DataSpec], UNLESS_DEFAULT]  # counts where it is not its default ({})
    path: Annotated[str | None, BY_DIGEST]                    # left out where the model's `digest` is set
    train_files: Annotated[list[str], files_by_digest("train")]  # counts as `train`: its files' digests

LEFT_OUT is for what does not change what is trained: places on disk, bookkeeping, what is logged and where it is
reported. UNLESS_DEFAULT is for a field added after stages existed: a stage that leaves it at its default keeps
the fingerprint it had before the field existed, so no finished stage of a user's run reruns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python


@dataclass(frozen=True)
class Fingerprint:
    """How a field enters the fingerprint; a field without one counts as it is."""

    rule: Literal["left out", "unless default", "by digest", "files by digest"]
    key: str = ""  # "files by digest": the name the digests count under


LEFT_OUT = Fingerprint("left out")
UNLESS_DEFAULT = Fingerprint("unless default")
BY_DIGEST = Fingerprint("by digest")  # a folder or hub name: its content's `digest` stands for it, where known


def files_by_digest(key: str) -> Fingerprint:
    """Local files: they count by their content, as the list of their digests (the model's `digests`: file ->
    digest) under `key`, so a moved file with the same bytes changes nothing."""
    return Fingerprint("files by digest", key)


def fingerprinted(model: BaseModel) -> dict[str, Any]:
    """The fields of `model` that count, and of the models in them, as JSON values."""
    values = dict(model)  # field name -> value
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        mark = next((m for m in field.metadata if isinstance(m, Fingerprint)), None)
        if mark is not None and mark.rule == "files by digest":
            out[mark.key] = [values["digests"][f] for f in values[name]]
        elif _counts(mark, field, values[name], values):
            out[name] = _counted(values[name])
    return out


def _counts(mark: Fingerprint | None, field: FieldInfo, value: Any, values: dict[str, Any]) -> bool:
    if mark is None:
        return True
    if mark.rule == "unless default":
        return bool(value != field.get_default(call_default_factory=True))
    if mark.rule == "by digest":
        return not values["digest"]
    return False  # left out


def _counted(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return fingerprinted(value)
    if isinstance(value, dict):
        return {k: _counted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_counted(v) for v in value]
    return to_jsonable_python(value)
