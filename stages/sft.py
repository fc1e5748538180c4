"""Instruction tuning (supervised fine-tuning) of a causal LM: it learns to write each prompt's completion.

    python -m torch.distributed.run --nproc_per_node N -m stages.sft --spec spec.json

What an example is, its template, labels, batches and eval are the sft head's (stages/runtime/heads/sft.py); this
program brings its sampler and the loss's weighting.

The loss counts every answer token of the global batch alike, however the tokens fall into examples, micro-batches
and ranks: a micro-batch's loss is the sum of its token losses × (grad_accum × world size) / N, where N is the
answer tokens of the whole global batch (all micro-batches of all ranks; the sampler knows them, as every rank
draws the same global batch). DeepSpeed divides each micro-batch's loss by grad_accum in backward and averages the
gradients over the ranks, so the step's gradient is exactly that of (sum of all N token losses) / N. The train loss
logged, the mean of the micro-batch losses, is then the global batch's mean per answer token.

Batches are grouped by length (sft.group_by_length): the epoch's shuffled order (seeded by seed and epoch, as
data.StreamSampler's) is sorted by length within windows of WINDOW global batches, whose order is then shuffled;
each global batch is sorted by length and cut into micro-batches, rank by rank. With a curriculum its schedule
draws the global batch and only the sorting applies. Every draw is a function of (seed, the step or samples
consumed), so a resumed stage draws what an unbroken one would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from contract.heads.sft import SftOptions
from contract.layout import EXIT_STOPPED
from stages.runtime import curriculum, entry, heads, lifecycle, models, records
from stages.runtime.checkpoint import Position
from stages.runtime.data import seed_of
from stages.runtime.dist import Dist
from stages.runtime.heads.sft import Head, check_packing
from stages.runtime.packing import check_block_size
from stages.runtime.spec import Spec, SpecError, TrainingSpec

PREDICTIONS = "eval_predictions.jsonl"  # the last eval's generations, in eval order (rank 0)
WINDOW = 16  # global batches sorted by length together


def main(spec: TrainingSpec, d: Dist) -> int:
    opts = spec.options_as(SftOptions)
    micro, accum = spec.train.micro_batch_size, spec.train.grad_accum
    # Before any data work, which can take long on a real corpus
    check_block_size(spec, spec.data.max_length, key="data.max_length")
    if opts.packing and (config := init_config(spec)) is not None:
        check_packing(config)
    tokenizer = models.load_tokenizer(spec)
    head = cast(Head, heads.of(spec, "sft", tokenizer, **spec.options))
    tokenizer.chat_template = head.template  # final/'s tokenizer writes its examples as training did

    def build(resume: bool):
        model = models.build_model(spec, head.auto(), tokenizer, resume=resume,
                                   **head.model_args(spec.ref("init").source == "config"))
        if opts.packing:
            check_packing(model.config)  # now with the attention implementation the model runs
        return model

    t = lifecycle.start(
        spec, d, num_samples=len(head.splits["train"]), what=f"sft, {head.describe()}", wrap=head.module,
        build=build, sampler=lambda pos, _: sampler(spec, d, head, pos),
    )
    drawn = cast(Grouped, t.sampler)
    weight = accum * d.world_size  # undoes DeepSpeed's 1/grad_accum and its mean over the ranks

    def micro_step(keys: list[tuple[int, int]]) -> torch.Tensor:
        batch = head.batch("train", keys, drawn.max_length)
        return answer_loss(head, t.engine(**batch), batch, weight / drawn.tokens)

    def evaluate(step: int) -> dict[str, float]:
        t.engine.eval()
        return head.evaluate(t.engine, "eval", micro, d, predictions=str(Path(spec.stage_dir, PREDICTIONS)))

    if t.fit(micro_step, evaluate, tokenizer, head=head):
        return EXIT_STOPPED
    return t.finish(evaluate, losses=lambda indices: head.example_losses(t.engine, indices))


def answer_loss(head: Head, rows: torch.Tensor, batch: dict[str, torch.Tensor], share: float) -> torch.Tensor:
    """A micro-batch's loss: the sum of its answer tokens' losses × `share` (grad_accum × world size / the answer
    tokens of the global batch; the module docstring says why)."""
    return F.cross_entropy(rows.float(), head.targets(batch), reduction="sum") * share


def init_config(spec: Spec) -> Any:
    """The init model's config where it is at hand (a config, a local folder), else None."""
    from transformers import AutoConfig

    init = spec.ref("init")
    try:
        if init.source == "config" and init.config:
            return AutoConfig.for_model(**init.config)
        return AutoConfig.from_pretrained(init.path) if init.path else None
    except (OSError, ValueError, TypeError):
        return None  # build_model reports a bad init with its own message


def sampler(spec: TrainingSpec, d: Dist, head: Head, pos: Position) -> Grouped:
    """The stage's sampler from position `pos`: its curriculum's schedule where it has one."""
    train = spec.train
    lengths = head.lengths("train")
    schedule = None
    if spec.curriculum is not None:
        schedule = curriculum.Schedule(spec.curriculum, len(lengths), seed=spec.seed,
                                       global_batch=train.micro_batch_size * train.grad_accum * d.world_size,
                                       difficulty=curriculum.difficulty(spec, head.splits["train"]))
    return Grouped(lengths, lambda indices, cut: head.trained("train", indices, cut), seed=spec.seed,
                   micro=train.micro_batch_size, accum=train.grad_accum, world=d.world_size, rank=d.rank,
                   max_length=head.max_length, group=spec.options_as(SftOptions).group_by_length, step=pos.step,
                   samples=pos.samples, schedule=schedule, log=records.log)


class Grouped:
    """This rank's micro-batches, step by step, grouped by length (the module docstring); `tokens`: the answer
    tokens of the whole global batch just drawn, which the loss is divided by (`trained(indices, cut)` counts
    them)."""

    max_length: int | None = None  # a curriculum phase's cut, for the step just drawn

    def __init__(self, lengths: list[int], trained: Callable[[list[int], int | None], int], *, seed: int,
                 micro: int, accum: int, world: int, rank: int, max_length: int, group: bool, step: int = 0,
                 samples: int = 0, schedule: curriculum.Schedule | None = None,
                 log: Callable[..., None] = lambda *_, **__: None) -> None:
        if not lengths:
            raise SpecError("data: the train split is empty")
        self.lengths, self.trained, self.n, self.seed = lengths, trained, len(lengths), seed
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.global_batch = micro * accum * world
        self.cut, self.group, self.schedule, self.log = max_length, group, schedule, log
        self.step, self.samples, self.tokens = step, samples, 1
        self._orders: dict[int, list[int]] = {}

    def next_step(self) -> list[list[tuple[int, int]]]:
        step = self.step + 1
        items = self._drawn(step) if self.schedule else [self._at(self.samples + j) for j in range(self.global_batch)]
        cut = min(self.cut, self.max_length or self.cut)
        if self.group:
            items = sorted(items, key=lambda item: (-min(self.lengths[item[0]], cut), item))
        self.tokens = max(1, self.trained([i for i, _ in items], self.max_length))
        self.step, self.samples = step, self.samples + self.global_batch
        slots = [(k * self.world + self.rank) * self.micro for k in range(self.accum)]
        return [items[s : s + self.micro] for s in slots]

    def _drawn(self, step: int) -> list[tuple[int, int]]:
        """The curriculum's global batch of `step`, its phase's cut, and its records (as CurriculumSampler)."""
        s = self.schedule
        assert s is not None
        k = s.begin(step, self.log)
        self.max_length = s.phases[k].max_length
        items = s.items(step, range(self.global_batch))
        if s.curriculum.log_draws:
            self.log("draw", step=step, phase=k, indices=[i for i, _ in items])
        return items

    def _at(self, i: int) -> tuple[int, int]:
        epoch, j = divmod(i, self.n)
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = self._order(epoch)
        return self._orders[epoch][j], epoch

    def _order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s examples: shuffled, then (grouping) sorted by length within windows whose global
        batches are shuffled."""
        g = torch.Generator().manual_seed(seed_of(self.seed, "epoch", epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        if not self.group:
            return order
        size, out = WINDOW * self.global_batch, []
        for w, start in enumerate(range(0, self.n, size)):
            window = sorted(order[start : start + size], key=lambda i: -self.lengths[i])  # stable: ties keep order
            chunks = [window[c : c + self.global_batch] for c in range(0, len(window), self.global_batch)]
            g = torch.Generator().manual_seed(seed_of(self.seed, "sft-window", epoch, w))
            out += [i for c in torch.randperm(len(chunks), generator=g).tolist() for i in chunks[c]]
        return out


if __name__ == "__main__":
    entry.run_training(main)
