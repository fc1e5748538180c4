"""Class labels of a classification data section: their names, each row's id, and macro-F1."""

from __future__ import annotations

import torch

from contract.spec import DataSpec
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
    return sorted(set(raw["train"][field]))


def label_ids(ds, field: str, label2id: dict[str, int], split: str, key: str = "data") -> list[int]:
    # Keyed by str(): a spec's "3" and a file's 3 name the same label.
    if field not in ds.column_names:
        raise SpecError(f"{key}.label_field: column {field!r} not in the {split} split (columns: {ds.column_names})")
    out = []
    for i, value in enumerate(ds[field]):
        if str(value) not in label2id:
            raise SpecError(f"{key}: {split} row {i}: label {value!r} is not one of {sorted(label2id)}")
        out.append(label2id[str(value)])
    return out


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (as scikit-learn's f1_score)."""
    tp = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return float(f1[present].mean()) if present.any() else 0.0
