"""Curriculum training: phases that draw from a growing share of the corpus, cap the sequence length, and
take easy examples first (a training stage's `curriculum:` section, `contract.sections.Curriculum`).

Which examples a step draws is a pure function of (seed, step, global batch G, corpus size N, difficulty):

- The corpus is ranked once: order random, a permutation of the N examples seeded by (seed,
  "curriculum-ranking"); order easy_first, by difficulty ascending (ties by row index).
- Phase k covers the optimizer steps start_k + 1 … until_step_k (steps counted from 1; start_0 = 0,
  start_k = until_step_{k-1}; the last phase runs to the end). Its **pool** is the first
  P_k = max(1, round(data_fraction_k × N)) examples of the ranking, so pools of growing fractions nest.
- Inside a phase the pool is drawn pass after pass: an **epoch of a phase** is one pass over that phase's
  pool, in a permutation seeded by (seed, "curriculum", k, epoch); epochs count from 0 in each phase. Step s
  of phase k takes the items [(s - 1 - start_k)·G, (s - start_k)·G) of that stream, and within them
  micro-step a gives rank r the slice at a·M·W + r·M, as `data.StreamSampler` does.
- An item's epoch, which e.g. mlm's masking is seeded by, is k·2^32 + epoch: distinct in every phase and pass.

No state is carried from step to step, so a stage resumed at step s (from its checkpoint's step) draws
exactly what an uninterrupted run draws; a checkpoint needs nothing more than the step.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from contract.layout import TRAIN_LOSSES
from contract.sections import Curriculum
from stages.runtime import dist, records
from stages.runtime.data import StreamSampler, seed_of
from stages.runtime.spec import Spec, SpecError, TrainingSpec

PHASE_EPOCHS = 1 << 32  # an item's epoch is phase × PHASE_EPOCHS + its pass over the phase's pool


class Schedule:
    """The curriculum's draws as a pure function of the step."""

    def __init__(self, curriculum: Curriculum, num_samples: int, *, seed: int, global_batch: int,
                 difficulty: Sequence[float] | None = None) -> None:
        n = num_samples
        if n == 0:
            raise SpecError("data: the train split is empty")
        self.curriculum, self.n, self.seed, self.global_batch = curriculum, n, seed, global_batch
        self.phases = curriculum.phases
        if curriculum.order == "easy_first":
            if difficulty is None or len(difficulty) != n:
                raise SpecError(f"curriculum: easy_first needs one difficulty per training example ({n})")
            self.ranking = torch.tensor(sorted(range(n), key=lambda i: (difficulty[i], i)), dtype=torch.long)
        else:
            g = torch.Generator().manual_seed(seed_of(seed, "curriculum-ranking"))
            self.ranking = torch.randperm(n, generator=g)
        self.starts = [0] + [p.until_step or 0 for p in self.phases[:-1]]
        self.pools = [max(1, math.floor(p.data_fraction * n + 0.5)) for p in self.phases]
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def phase_of(self, step: int) -> int:
        """The phase of optimizer step `step` (counted from 1)."""
        return bisect.bisect_left(self.starts, step) - 1

    def begin(self, step: int, log: Callable[..., None]) -> int:
        """The phase of step `step`; at the phase's first step, its `phase` record (what a sampler logs)."""
        k = self.phase_of(step)
        phase = self.phases[k]
        if step == self.starts[k] + 1:
            log("phase", phase=k, first_step=step, until_step=phase.until_step, pool=self.pools[k], examples=self.n,
                data_fraction=phase.data_fraction, max_length=phase.max_length, order=self.curriculum.order)
        return k

    def pool(self, phase: int) -> list[int]:
        """The examples phase `phase` draws from, easiest (or first ranked) first."""
        return self.ranking[: self.pools[phase]].tolist()

    def items(self, step: int, positions: Iterable[int]) -> list[tuple[int, int]]:
        """(example index, epoch) at `positions` of the global batch of step `step` (counted from 1)."""
        k = self.phase_of(step)
        size = self.pools[k]
        base = (step - 1 - self.starts[k]) * self.global_batch
        out = []
        for i in positions:
            epoch, j = divmod(base + i, size)
            out.append((int(self.ranking[self._perm(k, epoch, size)[j]]), k * PHASE_EPOCHS + epoch))
        return out

    def global_batch_of(self, step: int) -> list[int]:
        """Every rank's example indices of step `step`, in stream order."""
        return [i for i, _ in self.items(step, range(self.global_batch))]

    def _perm(self, phase: int, epoch: int, size: int) -> torch.Tensor:
        key = (phase, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(seed_of(self.seed, "curriculum", phase, epoch))
            self._perms = {k: p for k, p in self._perms.items() if k[0] == phase and k[1] >= epoch - 1}
            self._perms[key] = torch.randperm(size, generator=g)
        return self._perms[key]


class CurriculumSampler(StreamSampler):
    """This rank's micro-batches, step by step, of a curriculum's `Schedule`; sets `max_length` per step and
    writes a `phase` record to metrics.jsonl at each phase's first step (and, with log_draws, a `draw` record
    of every step's indices, gathered from all ranks)."""

    def __init__(self, num_samples: int, *, schedule: Schedule, step: int, log: Callable[..., None],
                 **stream: Any) -> None:
        super().__init__(num_samples, **stream)
        self.schedule, self.step, self._log = schedule, step, log
        self.phase = schedule.phase_of(step + 1)

    def next_step(self) -> list[list[tuple[int, int]]]:
        s = self.schedule
        step = self.step + 1
        k = self.phase = s.begin(step, self._log)
        self.max_length = s.phases[k].max_length
        micro = []
        for a in range(self.accum):
            start = a * self.micro * self.world + self.rank * self.micro
            micro.append(s.items(step, range(start, start + self.micro)))
        if s.curriculum.log_draws:
            every = dist.all_gather_objects(micro)  # collective: every rank runs next_step alike
            drawn = [i for a in range(self.accum) for rank in every for i, _ in rank[a]]
            self._log("draw", step=step, phase=k, indices=drawn)
        self.samples += self.global_batch
        self.step = step
        return micro


def difficulty(spec: Spec, train) -> list[float] | None:
    """Per training example, what easy_first ranks by (None without it): `train` is the tokenized split,
    which keeps the difficulty column (`data.tokenize`)."""
    c = spec.curriculum
    if c is None or c.difficulty is None:
        return None
    if c.difficulty.by == "length":
        return [float(len(ids)) for ids in train["input_ids"]]
    if c.difficulty.loss_of is not None:
        return _losses_of(spec, len(train))
    column = c.difficulty.column
    if column not in train.column_names:
        raise SpecError(f"curriculum.difficulty.column: no column {column!r} in the train split "
                        f"(columns: {', '.join(train.column_names)})")
    values = train[column]
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpecError(f"curriculum.difficulty.column: train row {i}: {column} is {v!r}, not a finite number")
    return [float(v) for v in values]


def _losses_of(spec: Spec, n: int) -> list[float]:
    """The training losses an earlier stage wrote with eval.score_train, checked against this stage's data."""
    ref = spec.ref("difficulty")
    path = Path(str(ref.path), TRAIN_LOSSES)
    where = f"curriculum.difficulty.loss_of: stage {ref.stage}"
    try:
        scored = json.loads(path.read_text())
        losses, digests = scored["losses"], scored["train_digests"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{where}: {path} is missing or unreadable ({e}); rerun it with eval.score_train") from None
    if digests != [spec.data.digests[f] for f in spec.data.train_files] or len(losses) != n:
        raise SpecError(f"{where} scored {len(losses)} examples of other training data than this stage's {n}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
        raise SpecError(f"{where}: {path} holds a loss that is not a finite number")
    return [float(v) for v in losses]


def sampler(spec: TrainingSpec, d: dist.Dist, *, num_samples: int, step: int, samples: int,
            difficulty: Sequence[float] | None) -> StreamSampler:
    """The stage's sampler from position (step, samples): the plain stream, or the curriculum's schedule."""
    train = spec.train
    stream: dict[str, Any] = dict(seed=spec.seed, micro_batch=train.micro_batch_size, grad_accum=train.grad_accum,
                                  world_size=d.world_size, rank=d.rank, samples=samples)
    if spec.curriculum is None:
        return StreamSampler(num_samples, **stream)
    assert train.global_batch_size is not None, "the contract sets it"
    schedule = Schedule(spec.curriculum, num_samples, seed=spec.seed, global_batch=train.global_batch_size,
                        difficulty=difficulty)
    return CurriculumSampler(num_samples, schedule=schedule, step=step, log=records.log, **stream)
