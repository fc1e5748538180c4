"""Micro-batches mixed from several streams of training rows (multitask: its tasks; distill: the labelled rows and
a transfer set), each micro-batch from one stream.

Which stream global micro-batch m draws is a pure function of (seed, m) (`Draws`): every rank draws the same one,
so all ranks run the same modules (ZeRO-3 gathers parameters per module). A stream's own position is how often it
was drawn before m, recomputed from the step on resume, and each stream is read as `data.StreamSampler` reads one
split (per-epoch permutations seeded by (seed, "task", its name, epoch)): a resumed run draws, samples and masks
exactly as an uninterrupted one. The positions depend on the world size, so such a stage cannot resume at another.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from contract.layout import newest_complete
from stages.runtime import data, records
from stages.runtime.checkpoint import Position
from stages.runtime.dist import Dist
from stages.runtime.spec import SpecError, TrainingSpec

BLOCK = 4096  # task draws are made in blocks of this many micro-batches, each block from a seed of its own


class Draws:
    """The task of global micro-batch m, and how often each task was drawn before m: from (seed, m) alone."""

    def __init__(self, p: torch.Tensor, seed: int) -> None:
        cdf = p.cumsum(0)
        self.cdf, self.k, self.seed = cdf / cdf[-1], len(p), seed
        self._blocks: dict[int, torch.Tensor] = {}

    def block(self, b: int) -> torch.Tensor:
        if b not in self._blocks:
            g = torch.Generator().manual_seed(data.seed_of(self.seed, "tasks", b))
            u = torch.rand(BLOCK, generator=g, dtype=torch.float64)
            # right=True: a task with p = 0 (a flat step of the cdf) is never drawn
            self._blocks = {b: torch.searchsorted(self.cdf, u, right=True).clamp(max=self.k - 1)}
        return self._blocks[b]

    def tasks(self, start: int, count: int) -> list[int]:
        out: list[int] = []
        for m in range(start, start + count):
            out.append(int(self.block(m // BLOCK)[m % BLOCK]))
        return out

    def counts_before(self, m: int) -> list[int]:
        counts = torch.zeros(self.k, dtype=torch.long)
        for b in range(m // BLOCK):
            counts += torch.bincount(self.block(b), minlength=self.k)
        counts += torch.bincount(self.block(m // BLOCK)[: m % BLOCK], minlength=self.k)
        return counts.tolist()


class TaskBatch(list):
    """A micro-batch's (index, epoch) items in its task's stream, and the task."""

    def __init__(self, items: list[tuple[int, int]], task: int) -> None:
        super().__init__(items)
        self.task = task


class MixedSampler:
    """This rank's micro-batches, step by step, as `loop.fit` asks a sampler for them (see the module docstring)."""

    max_length: int | None = None

    def __init__(self, draws: Draws, sizes: list[int], *, seed: int, names: list[str], micro: int, accum: int,
                 world: int, rank: int, step: int, samples: int, log, log_every: int, max_steps: int) -> None:
        self.draws, self.sizes, self.seed, self.names = draws, sizes, seed, names
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.step, self.samples, self.log, self.log_every, self.max_steps = step, samples, log, log_every, max_steps
        self.window: list[list[str]] = []  # the tasks of each step since the last `mixing` record
        self.used = draws.counts_before(step * accum)  # micro-batches of each task so far
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def next_step(self) -> list[list[tuple[int, int]]]:
        out: list[list[tuple[int, int]]] = []
        for task in self.draws.tasks(self.step * self.accum, self.accum):
            start = self.used[task] * self.micro * self.world + self.rank * self.micro
            out.append(TaskBatch([self._at(task, start + j) for j in range(self.micro)], task))
            self.used[task] += 1
        self.step += 1
        self.samples += self.micro * self.accum * self.world
        self.window.append([self.names[b.task] for b in out if isinstance(b, TaskBatch)])
        if self.step % self.log_every == 0 or self.step == self.max_steps:
            # per step of the window, its micro-batches' tasks; drawn: micro-batches per task from step 1 on
            self.log("mixing", step=self.step, tasks=self.window, drawn=dict(zip(self.names, self.used, strict=True)))
            self.window = []
        return out

    def _at(self, task: int, i: int) -> tuple[int, int]:
        epoch, j = divmod(i, self.sizes[task])
        if (task, epoch) not in self._perms:
            g = torch.Generator().manual_seed(data.seed_of(self.seed, "task", self.names[task], "epoch", epoch))
            self._perms = {k: v for k, v in self._perms.items() if k[0] != task or k[1] >= epoch - 1}
            self._perms[task, epoch] = torch.randperm(self.sizes[task], generator=g)
        return int(self._perms[task, epoch][j]), epoch




def sampler(spec: TrainingSpec, d: Dist, p: torch.Tensor, sizes: list[int], names: list[str]
            ) -> Callable[[Position, int], MixedSampler]:
    """What `lifecycle.start(sampler=…)` takes: streams `names` of `sizes` rows each, drawn with probabilities `p`,
    from the stage's seed and batch shape. Exit 2 when the newest checkpoint was saved at another world size."""
    saved = newest_complete(spec.stage_dir)
    if saved and saved[1].get("world_size") not in (None, d.world_size):
        raise SpecError(f"{spec.stage_dir}/ckpt: saved at world size {saved[1]['world_size']}, now {d.world_size}: "
                        f"kind {spec.kind} draws its micro-batches from {', '.join(names)} per global micro-batch "
                        "and cannot resume at another world size")
    return lambda pos, max_steps: MixedSampler(
        Draws(p, spec.seed), sizes, seed=spec.seed, names=names, micro=spec.train.micro_batch_size,
        accum=spec.train.grad_accum, world=d.world_size, rank=d.rank, step=pos.step, samples=pos.samples,
        log=records.log, log_every=spec.train.log_every, max_steps=max_steps)
