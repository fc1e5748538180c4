"""Logits ensembles and weight soups: how members are combined, shared by `stages/ensemble.py` and by users.

A logits ensemble's final/ (kind `ensemble`, method `logits`) loads with `load`:

    from transformers import AutoTokenizer
    from stages.runtime.ensemble import load

    ensemble = load("runs/ensemble/stages/ens-logits/final")        # a torch.nn.Module, in eval mode
    tokenizer = AutoTokenizer.from_pretrained("runs/ensemble/stages/ens-logits/final")
    logits = ensemble(**tokenizer(["a small bird"], return_tensors="pt"))   # [batch, labels]
    ensemble.id2label[int(logits.argmax(-1)[0])]

The combined logits are log p̄, p̄ = Σ_i w_i softmax(z_i), the weighted average of the members' predicted
probabilities (weights normalised to sum 1): softmax gives p̄ back, argmax is p̄'s, and cross-entropy on them is
the ensemble's negative log-likelihood. Members that are causal LMs give [batch, positions, vocabulary] logits,
combined per position: each next token's probabilities averaged. A soup's or a merge's final/ is a plain model:
load it with from_pretrained.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MANIFEST = "ensemble.json"  # in a logits ensemble's final/: method, members, weights, labels
FORMAT = 1
IGNORED_CONFIG = ("transformers_version",)  # and keys starting with "_" (_name_or_path …): where, not what


def normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def combine(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log Σ_i w_i softmax(z_i) (float32) of the members' logits z_i [..., labels]; `weights` are normalised here."""
    w = torch.tensor(normalised(weights), dtype=torch.float32)
    stacked = torch.stack([F.log_softmax(z.float(), dim=-1) for z in logits])  # [members, ..., labels]
    return torch.logsumexp(stacked + w.log().view(-1, *[1] * (stacked.dim() - 1)), dim=0)


class LogitsEnsemble(nn.Module):
    """Members (models with one head: classifiers with the same labels, or language models with one vocabulary)
    whose forward returns the combined logits."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], id2label: Mapping[int, str]) -> None:
        super().__init__()
        if len(members) != len(weights):
            raise ValueError(f"{len(members)} members but {len(weights)} weights")
        self.members = nn.ModuleList(members)
        self.weights = normalised(weights)
        self.id2label = dict(id2label)

    def forward(self, **batch: Any) -> torch.Tensor:
        """The tokenizer's batch (input_ids, attention_mask …; no labels) → combined logits [batch, labels] (a
        language model's: [batch, positions, vocabulary])."""
        return combine([m(**batch).logits for m in self.members], self.weights)


class AsModel(nn.Module):
    """A LogitsEnsemble called as a transformers model is (its output's `.logits`), for a head's module."""

    def __init__(self, ensemble: LogitsEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.config = ensemble.members[0].config

    def forward(self, **batch: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.ensemble(**batch))


def load(path: str | Path, **kwargs: Any) -> LogitsEnsemble:
    """The logits ensemble in `path` (a final/ folder of method logits), in eval mode. `kwargs` go to every
    member's `AutoModelFor….from_pretrained` (the class of the ensemble's task; e.g. dtype, device_map)."""
    from stages.runtime import heads

    folder = Path(path)
    manifest = json.loads((folder / MANIFEST).read_text())
    auto = heads.auto(manifest.get("task", "classify"))  # written before tasks other than classify: a classifier
    if manifest.get("method") != "logits":
        raise ValueError(f"{folder}: method {manifest.get('method')!r} is a plain model: load it with "
                         f"{auto.__name__}.from_pretrained")
    members = [auto.from_pretrained(folder / m["path"], **kwargs) for m in manifest["members"]]
    labels = {i: str(name) for i, name in enumerate(manifest["labels"] or [])}
    return LogitsEnsemble(members, [m["weight"] for m in manifest["members"]], labels).eval()


# ----------------------------------------------------------------- soups


def config_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first config key (as config.to_dict() gives them) on which two models' architectures differ."""
    keys = sorted((set(a) | set(b)) - set(IGNORED_CONFIG))
    return next((k for k in keys if not k.startswith("_") and a.get(k) != b.get(k)), None)


def state_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> str | None:
    """Why two state dicts cannot be averaged (a key one lacks, another shape or dtype), or None."""
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            return f"{key}: only in one of them"
        if a[key].shape != b[key].shape or a[key].dtype != b[key].dtype:
            return f"{key}: {tuple(a[key].shape)} {a[key].dtype} vs {tuple(b[key].shape)} {b[key].dtype}"
    return None


class Soup:
    """A running uniform average of state dicts of one architecture: floating tensors summed in float64 and cast
    back to their dtype when averaged; other tensors (integer buffers such as position_ids) must be equal and are
    copied. Raises ValueError naming the tensor that cannot be averaged."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.dtypes = {k: v.dtype for k, v in state.items()}
        self.sums = {k: v.detach().to(torch.float64, copy=True) if v.is_floating_point() else v.detach().clone()
                     for k, v in state.items()}
        self.count = 1

    def add(self, state: Mapping[str, torch.Tensor]) -> None:
        self._check(state)
        for k, v in state.items():
            if v.is_floating_point():
                self.sums[k] += v.detach().to(torch.float64)
        self.count += 1

    def average(self, extra: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The average of the soup's state dicts, and of `extra` too where given (the soup is not changed)."""
        if extra is not None:
            self._check(extra)
        n = self.count + (extra is not None)
        out = {}
        for k, total in self.sums.items():
            if total.is_floating_point():
                if extra is not None:
                    total = total + extra[k].detach().to(torch.float64)
                out[k] = (total / n).to(self.dtypes[k])
            else:
                out[k] = total.clone()
        return out

    def _check(self, state: Mapping[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if k in self.dtypes and not v.is_floating_point() and not torch.equal(v, self.sums[k]):
                raise ValueError(f"{k}: a non-floating tensor that differs between the members (it cannot be "
                                 "averaged)")
