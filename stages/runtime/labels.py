"""Class labels of a classification data section: their names, each row's id, and macro-F1.

A label is a string or an integer, one type in the whole column (`datasets` reads a column that mixes them, or
holds floats, as JSON values, which cannot be sorted into names). A row whose label is missing, null, of another
type, or not among the names is exit 2 naming the file and the row in it (1-based, as the file holds them),
never a crash: validate samples only the first rows of each file, the stage reads them all."""

from __future__ import annotations

import json

import torch

from contract.spec import DataSpec
from stages.runtime.data import locate
from stages.runtime.spec import SpecError


def label_names(data: DataSpec, raw: dict, key: str = "data") -> list[str | int]:
    """data.labels (names in id order), else the sorted unique labels of the train split."""
    field = data.label_field
    if not field:
        raise SpecError(f"{key}.label_field: required for a classifier")
    for split, ds in raw.items():
        if ds is not None and field not in ds.column_names:
            raise SpecError(f"{key}.label_field: column {field!r} not in the {split} split "
                            f"(columns: {ds.column_names})")
    if data.labels is not None:
        return list(data.labels)
    values = raw["train"][field]
    check_values(values, data, "train", key)
    return sorted(set(values))


def label_ids(ds, data: DataSpec, label2id: dict[str, int], split: str, key: str = "data",
              whose: str = "the training data's labels") -> list[int]:
    """Each row's label id. `whose`: where the names came from, for the message about a label not among them."""
    # Keyed by str(): a spec's "3" and a file's 3 name the same label.
    field = data.label_field
    if field not in ds.column_names:
        raise SpecError(f"{key}.label_field: column {field!r} not in the {split} split (columns: {ds.column_names})")
    values = ds[field]
    check_values(values, data, split, key)
    out = []
    for i, value in enumerate(values):
        if str(value) not in label2id:
            raise SpecError(f"{key}: {locate(data, split, i)}: label {_show(value)} is not one of "
                            f"{', '.join(label2id)} ({whose})")
        out.append(label2id[str(value)])
    return out


def check_values(values: list, data: DataSpec, split: str, key: str) -> None:
    """SpecError at the first label that is missing or null, neither a string nor an integer, or not of the first
    row's type."""
    first = None
    for i, value in enumerate(values):
        if value is None:
            problem = "label is null; every row needs a label"
        elif isinstance(value, bool) or not isinstance(value, (str, int)):
            problem = f"label is {_show(value)}, not a string or an integer"
        elif first is not None and isinstance(value, str) != isinstance(values[first], str):
            kinds = ("a string", "a number") if isinstance(values[first], str) else ("a number", "a string")
            at = locate(data, split, first)
            here = locate(data, split, i)
            if at.rsplit(": ", 1)[0] == here.rsplit(": ", 1)[0]:
                at = at.rsplit(": ", 1)[1]
            problem = (f"label is {_show(value)}, {kinds[1]}, where {at}'s is {kinds[0]} {_show(values[first])}; "
                       "one label column holds one type")
        else:
            first = i if first is None else first
            continue
        raise SpecError(f"{key}: {locate(data, split, i)}: {problem}")


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (as scikit-learn's f1_score)."""
    tp = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return float(f1[present].mean()) if present.any() else 0.0
