"""Merging models of one architecture into one model, training nothing: task arithmetic (Ilharco et al. 2023), TIES
(Yadav et al. 2023) and DARE (Yu et al. 2023) against a base model, SLERP between two models.

The conventions are mergekit's (0.1.5: merge_methods/generalized_task_arithmetic.py, sparsify.py, slerp.py), so a
merge here gives the tensors a mergekit-yaml merge of the same models gives (tests/stages/test_merging.py checks
both against the papers' formulas and against mergekit itself). For each floating tensor, with δ_i = θ_i − θ_base:

- task_arithmetic: θ_base + Σ w_i δ_i (normalize: divided by Σ w_i).
- ties: each δ_i trimmed to its density · numel entries of largest magnitude; the δ_i weighted; per entry the
  elected sign is that of Σ w_i δ_i (≥ 0: +); the entries that agree with it are summed (entries trimmed to 0 agree
  with neither sign) and, with normalize (the default), divided by the sum of the weights of those agreeing: the
  paper's disjoint mean where the weights are 1.
- dare: each δ_i keeps each entry with probability density (a Bernoulli draw; the paper's drop rate p is
  1 − density); with rescale (the default) the kept entries are scaled so δ_i keeps its L1 norm exactly (the paper
  scales by 1 / density, which keeps it in expectation); then as task_arithmetic.
- slerp: each tensor of the two models taken as one vector, the spherical interpolation at t between them, along
  the great circle through their directions; nearly parallel tensors (|cos| > 0.9995) are interpolated linearly.

Every tensor is computed in float32 (float64 for float64 tensors) and cast back to its dtype. Tensors that are not
floating (integer buffers such as position_ids) must be equal in every model and are copied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

METHODS = ("task_arithmetic", "ties", "dare", "slerp")
SLERP_PARALLEL = 0.9995  # |cos| of two tensors above which slerp interpolates linearly (mergekit's dot_threshold)
EPS = 1e-8


def merge(method: str, states: Sequence[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor] | None, *,
          weights: Sequence[float], densities: Sequence[float], normalize: bool, rescale: bool, t: float,
          seed: int) -> dict[str, torch.Tensor]:
    """The merged state dict of the members' `states` (and `base`, for the task-vector methods). DARE's draws for
    member i's tensor `name` come from a generator seeded by (seed, i, name) alone, so a rerun, any order of the
    tensors and any number of ranks give the same tensors. ValueError names a tensor that cannot be merged."""
    out: dict[str, torch.Tensor] = {}
    tied: dict[tuple, str] = {}  # a tensor shared under two names (tied embeddings) is merged once, as the first
    for name, first in states[0].items():
        alias = (first.data_ptr(), first.shape, first.stride())
        if first.numel() and alias in tied:
            out[name] = out[tied[alias]]
            continue
        tied[alias] = name
        tensors = [s[name] for s in states]
        if not first.is_floating_point():
            for other in [*tensors[1:], *([base[name]] if base is not None else [])]:
                if not torch.equal(other, first):
                    raise ValueError(f"{name}: a non-floating tensor that differs between the models (it cannot be "
                                     "merged)")
            out[name] = first.clone()
        elif method == "slerp":
            out[name] = slerp(t, tensors[0], tensors[1])
        else:
            assert base is not None, f"{method} merges task vectors against a base"
            generators = [generator(seed, i, name) for i in range(len(tensors))] if method == "dare" else None
            out[name] = task_vectors(method, base[name], tensors, weights=weights, densities=densities,
                                     normalize=normalize, rescale=rescale, generators=generators)
    return out


def generator(seed: int, member: int, name: str) -> torch.Generator:
    """The generator of DARE's drops in member `member`'s tensor `name`."""
    digest = hashlib.sha256(f"{seed}/{member}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def task_vectors(method: str, base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Sequence[float],
                 densities: Sequence[float], normalize: bool, rescale: bool,
                 generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One tensor merged by task_arithmetic, ties or dare (see the module's docstring). `generators`: dare's, one
    per member (the same one repeated draws the members in order, as mergekit does from torch's global one)."""
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(work)
    deltas = torch.stack([sparsify(method, t.to(work) - b, density, rescale, generators[i] if generators else None)
                          for i, (t, density) in enumerate(zip(tensors, densities, strict=True))])
    w = torch.tensor(weights, dtype=work).view(-1, *[1] * b.dim())
    deltas = deltas * w
    if method == "ties":
        sign = deltas.sign()
        elected = (deltas.sum(0) >= 0).to(work) * 2 - 1
        agree = (sign == elected).to(work)
        mixed, divisor = (deltas * agree).sum(0), (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), w.sum(0)
        divisor[divisor.abs() < EPS] = 1
    if normalize:
        mixed = mixed / divisor
    return (b + mixed).to(base.dtype)


def sparsify(method: str, delta: torch.Tensor, density: float, rescale: bool,
             generator: torch.Generator | None) -> torch.Tensor:
    """ties: the density · numel entries of largest magnitude (at least one); dare: each entry kept with probability
    density; with `rescale`, scaled back to δ's L1 norm. task_arithmetic (or density 1): δ as it is."""
    if method == "task_arithmetic" or density >= 1:
        return delta
    if method == "ties":
        if density <= 0 or delta.numel() == 0:
            return torch.zeros_like(delta)
        keep = torch.argsort(delta.abs().reshape(-1), descending=True)[: max(1, int(density * delta.numel()))]
        mask = torch.zeros(delta.numel(), dtype=delta.dtype)
        mask[keep] = 1
        mask = mask.view_as(delta)
    else:
        mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The point at t (0: v0, 1: v1) on the great circle between v0 and v1 (each flattened into one vector), with
    their lengths interpolated as the coefficients give; nearly parallel tensors interpolated linearly."""
    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
    if not a.numel():
        return v0.clone()
    norm_a, norm_b = (torch.linalg.vector_norm(x) for x in (a, b))
    norm_a, norm_b = torch.where(norm_a > EPS, norm_a, 1), torch.where(norm_b > EPS, norm_b, 1)
    cos = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    coef_a: float | torch.Tensor
    coef_b: float | torch.Tensor
    if cos.abs() > SLERP_PARALLEL:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(cos)
        coef_a, coef_b = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)
