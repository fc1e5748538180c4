"""The life of a training stage: `start` (the set-up every stage runs, in the one order that resumes
exactly), `Training.fit` (the loop) and `Training.finish` (final eval, export, result).

A stage script keeps only what is its own: its data and batches, its loss, its eval.

    t = lifecycle.start(spec, d, num_samples=len(train), build=..., what="mlm, 4000 samples")
    if t.fit(micro_step, evaluate, tokenizer, head=head):
        return EXIT_STOPPED
    return t.finish(evaluate)

With eval.best, final/ is the model of the best eval (`best.Selection`): each new best is exported to best/ as
final/ would be, and `finish` makes best/ final/ unless the last step's model is the best.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contract.layout import EXIT_DONE, TRAIN_LOSSES, ckpt_dir, final_dir, step_of, tag_of
from contract.sections import Unfreeze
from stages.runtime import (
    adapters,
    checkpoint,
    curriculum,
    data,
    dist,
    engine,
    export,
    layers,
    loop,
    models,
    records,
    shared_eval,
    speed,
)
from stages.runtime.best import BEST, STEP_FILE, Selection
from stages.runtime.checkpoint import Position
from stages.runtime.dist import Dist
from stages.runtime.heads import Head
from stages.runtime.loop import Evaluate, MicroStep, Sampler
from stages.runtime.spec import SpecError, TrainingSpec

# Each example's loss, one value per index of a batch of training examples (eval.score_train)
ExampleLosses = Callable[[list[int]], torch.Tensor]


@dataclass
class Training:
    spec: TrainingSpec
    model: nn.Module  # the transformers model: what final/ saves (with an adapter: in its layers; `adapter` saves)
    engine: Any  # the DeepSpeed engine; wraps `model`, or a loss module around it
    sampler: Sampler  # this rank's micro-batches from the current position on
    num_samples: int  # training examples
    pos: Position
    max_steps: int
    build: Callable[[bool], nn.Module]
    wrap: Callable[[nn.Module], nn.Module] | None
    unfreezing: layers.Unfreezing | None  # gradual unfreezing: a new engine at each phase
    d: Dist
    selection: Selection | None  # eval.best: the best eval so far, restored from the checkpoint
    # what final/ holds and who scores it, given to `fit` (a new best is exported then) for `finish` too
    tokenizer: Any = None
    head: Head | None = None
    beside: dict[str, nn.Module] | None = None
    adapter: nn.Module | None = None  # with spec.adapter: peft's model around `model` (which holds the adapter)

    def fit(self, micro_step: MicroStep, evaluate: Evaluate, tokenizer, *, head: Head | None = None,
            beside: dict[str, nn.Module] | None = None) -> bool:
        """Train to max_steps; True when a signal stopped it (a checkpoint is saved: exit 75). `tokenizer` is
        saved in final/ beside the model, with the models `beside` in folders below it (multitask's classifiers);
        `head` reads the model for the shared eval sets (None: a model the sets do not fit)."""
        self.tokenizer, self.head, self.beside = tokenizer, head, beside
        stopped, self.pos = loop.fit(self.engine, self.spec, self.sampler, micro_step, evaluate, pos=self.pos,
                                     max_steps=self.max_steps, flops=speed.flops_of(self.model),
                                     unfreezing=self.unfreezing, renew=self.renew, selection=self.selection,
                                     keep=self._keep)
        return stopped

    def _keep(self, step: int) -> None:
        """Collective. The eval at `step` is the best so far: the shared eval sets score its model (their scores
        join its metrics), which is exported to best/ as final/ would be, with the step it holds."""
        assert self.selection is not None
        self.selection.metrics |= self._shared_scores()
        export.save_final(self.adapter or self.model, self.tokenizer, self.spec,
                          zero_stage=engine.zero_stage(self.spec), beside=self.beside,
                          files={STEP_FILE: {"step": step}}, folder=Path(self.spec.stage_dir) / BEST)

    def renew(self, pos: Position):
        """Collective. A fresh engine for the layer groups that train from `pos` on (gradual unfreezing: DeepSpeed
        fixes the trainable set at initialize): the weights carried over exactly (gathered under ZeRO-3), the
        schedule at pos.step, Adam's moments started afresh for every trainable group. The engine a resume builds
        for a checkpoint of this phase is the same, so the run goes on as one never stopped."""
        with _rng_kept():  # building reseeds; the dropout streams go on as if nothing happened
            model = self.build(True)
            net = self.wrap(model) if self.wrap else model
            layers.copy_weights(self.engine.module, net, zero3=engine.zero_stage(self.spec) == 3)
            self.engine.destroy()
            self.engine = _engine(self.spec, net, model, self.max_steps, self.unfreezing, step=pos.step,
                                  schedule_step=pos.step)
        self.model = model
        self.engine.global_samples = pos.samples
        return self.engine

    def finish(self, evaluate: Evaluate, losses: ExampleLosses | None = None) -> int:
        """Collective. The final eval (if eval.at_end) and the shared eval sets' scores (spec.shared_evals), final/
        (what `fit` was given; with eval.score_train each training example's loss, `losses(indices)` by batch),
        then result.json. With eval.best and an earlier best step, final/ is best/ and the metrics are its eval's;
        the last step's are kept beside them (result.json's last_metrics)."""
        spec, sel, pos = self.spec, self.selection, self.pos
        final_metrics: dict[str, float] = {}
        fresh: dict[str, float] = {}  # evaluated here: recorded as one eval record, with the shared sets' scores
        if sel is not None and sel.last_step == pos.step:  # evaluated in the loop (early stopping), or a resume
            final_metrics = dict(sel.last_metrics)
        elif spec.eval.at_end:
            final_metrics = fresh = evaluate(pos.step)
            if sel is not None and fresh:
                sel.see(pos.step, fresh)  # the last step's model may be the best
        if sel is not None and sel.step is not None and sel.step != pos.step:
            if fresh:
                loop.record_eval(spec, pos.step, fresh)
            return self._finish_with_best()
        shared = self._shared_scores()
        if fresh or shared:
            loop.record_eval(spec, pos.step, fresh | shared)
        final_metrics = final_metrics | shared
        files = {}
        if spec.eval.score_train:
            assert losses is not None, f"kind {spec.kind} scores its training examples: finish needs losses"
            files[TRAIN_LOSSES] = self._train_losses(losses)
        path, digest = export.save_final(self.adapter or self.model, self.tokenizer, spec,
                                         zero_stage=engine.zero_stage(spec), beside=self.beside, files=files)
        export.write_result(spec, steps=pos.step, samples=pos.samples, output=path, digest=digest,
                            metrics=final_metrics, **self._selected())
        return EXIT_DONE

    def _finish_with_best(self) -> int:
        """Collective. final/ is best/ (linked, not copied: best/ stays until result.json is written, so a stage
        killed in between finishes alike); the last step's model is kept in a checkpoint of its own."""
        spec, sel, pos = self.spec, self.selection, self.pos
        assert sel is not None
        # Rank 0's view of the folder, for all: another rank may look before rank 0 has written COMPLETE
        saved = dist.all_gather_objects((ckpt_dir(spec.stage_dir) / tag_of(pos.step) / "COMPLETE").exists())[0]
        if not saved:  # an early stop has saved it, or it was resumed from
            checkpoint.save(self.engine, spec, Position(step=pos.step, samples=pos.samples, best=sel.state()))
        best, digest = Path(spec.stage_dir) / BEST, None
        if dist.is_main():
            held = json.loads((best / STEP_FILE).read_text())["step"]
            if held != sel.step:  # a best exported by an attempt that a resume did not repeat (not deterministic)
                raise RuntimeError(f"{best} holds the model of step {held}, but the best eval is step {sel.step}'s; "
                                   "delete the stage folder to run the stage again")
            tmp = final_dir(spec.stage_dir).with_name("final.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(best, tmp, copy_function=_link, ignore=shutil.ignore_patterns(STEP_FILE))
            digest = export.publish(tmp, final_dir(spec.stage_dir))
        dist.barrier()
        records.log("best", step=sel.step, metric=sel.best.metric, value=sel.metrics.get(sel.best.metric),
                    last_step=pos.step)
        dist.print0(f"final/ is step {sel.step}'s model, the best by {sel.best.metric}; the last step was {pos.step}")
        export.write_result(spec, steps=pos.step, samples=pos.samples, output=str(final_dir(spec.stage_dir)),
                            digest=digest, metrics=sel.metrics, **self._selected())
        if dist.is_main():
            shutil.rmtree(best)
        return EXIT_DONE

    def _selected(self) -> dict[str, Any]:
        """result.json's record of eval.best: the step final/ holds, the last step's metrics, an early stop."""
        sel, pos = self.selection, self.pos
        if sel is None or sel.step is None:
            return {}
        return {"best_step": sel.step, "last_metrics": sel.last_metrics if sel.last_step == pos.step else None,
                "stopped_early": sel.reason() if sel.exhausted and pos.step < self.max_steps else None}

    def _shared_scores(self) -> dict[str, float]:
        """Collective. The shared eval sets' scores of the model (spec.shared_evals; {} without sets)."""
        spec, head = self.spec, self.head
        if not spec.shared_evals:
            return {}
        if head is None:
            raise SpecError(f"shared_evals: kind {spec.kind} is scored on no shared eval set, but the spec gives "
                            f"{', '.join(spec.shared_evals)}")
        return shared_eval.score(spec, self.d, self.model, self.tokenizer, head.name,
                                 batch_size=spec.train.micro_batch_size, options=head.source.options)

    def _train_losses(self, losses: ExampleLosses) -> dict[str, Any]:
        """Collective. Every training example's loss under the final model, in row order (eval mode; the ranks
        score a strided share each, as in eval), for final/train_losses.json."""
        spec, n = self.spec, self.num_samples
        values = torch.zeros(n, dtype=torch.float64)
        self.engine.eval()
        with torch.no_grad():
            for indices in data.eval_shards(n, spec.train.micro_batch_size, dist.world_size(), dist.rank()):
                real = [j for j, i in enumerate(indices) if i >= 0]  # padding rows (-1): forward pass only
                got = losses([max(i, 0) for i in indices]).double().cpu()
                values[[indices[j] for j in real]] = got[real]
        dist.all_reduce_sum(values)
        out = values.tolist()
        records.log("train_losses", examples=n, mean=sum(out) / max(n, 1), min=min(out, default=0.0),
                    max=max(out, default=0.0))
        return {"stage": spec.stage, "examples": n,
                "train_digests": [spec.data.digests[f] for f in spec.data.train_files], "losses": out}


def start(spec: TrainingSpec, d: Dist, *, num_samples: int, build: Callable[[bool], nn.Module],
          wrap: Callable[[nn.Module], nn.Module] | None = None, what: str,
          difficulty: Sequence[float] | None = None, unfreeze: Unfreeze | None = None,
          sampler: Callable[[Position, int], Sampler] | None = None) -> Training:
    """Collective. Set up a training stage, in the order that makes a resumed run follow an unbroken one.

    1. Find the newest complete checkpoint *before* building: resume beats init, so on resume
       `build(True)` makes only the architecture and the checkpoint brings the weights. One saved at
       another world size (checkpoint.on_world_size_change: resume) is converted to a universal checkpoint.
    2. Build the model (`build(resume)`, seeded alike on every rank) and `wrap` it (a loss module).
    3. deepspeed.initialize, with the schedule as a LambdaLR so checkpoints hold it. With `unfreeze` (gradual
       unfreezing) or train.layer_lr_decay, the model's layer groups (`layers`) say what trains at which rate.
    4. Seed dropout per rank *after* initialize (which draws from the RNG).
    5. Load the checkpoint: weights, optimizer, schedule, this rank's RNG and the data position.

    `difficulty`: per training example, what a curriculum's easy_first ranks by (`curriculum.difficulty`).
    `sampler(position, max_steps)`: a stage's own sampler (multitask: its task mixing) instead of the
    plain stream or the curriculum's.
    """
    max_steps = engine.max_steps(spec.train, num_samples)
    saved = checkpoint.find_latest(spec)
    resharded = saved is not None and saved.world_size not in (None, d.world_size)
    # ZeRO-0 saves whole optimizer states, which load at any world size; ZeRO 1-3 save partitions
    universal = resharded and engine.zero_stage(spec) > 0
    if saved is not None and universal:
        checkpoint.to_universal(spec, saved.tag)
    # An adapter's base is frozen, and a ZeRO-3 checkpoint restores only what the optimizer holds: the base always
    # comes from init (as frozen, it is what it was at step 0), the adapter from the checkpoint.
    model = build(saved is not None and spec.adapter is None)
    peft = adapters.wrap(spec, model) if spec.adapter is not None else None
    net = wrap(model) if wrap else model
    unfreezing = None if unfreeze is None else layers.Unfreezing(unfreeze, len(layers.groups(net, model)))
    net = _engine(spec, net, model, max_steps, unfreezing, step=step_of(saved.tag) if saved else 0,
                  load_universal=universal)
    models.seed_dropout(spec, d.rank)
    pos = checkpoint.load(net, spec, saved, universal) if saved else Position(step=0, samples=0)
    resuming = "" if saved is None else f", resuming from {saved.tag}" + (
        f" (saved at world size {saved.world_size}, now {d.world_size})" if resharded else "")
    dist.print0(f"{spec.stage}: {what}, {max_steps} steps, ZeRO-{engine.zero_stage(spec)}{resuming}")
    records.start(d.world_size, step=pos.step, max_steps=max_steps,
                  resharded_from=saved.world_size if saved and resharded else None)
    drawn = sampler(pos, max_steps) if sampler else curriculum.sampler(
        spec, d, num_samples=num_samples, step=pos.step, samples=pos.samples, difficulty=difficulty)
    selection = None
    if spec.eval.best is not None:
        selection = Selection(spec.eval.best, spec.eval.patience)
        selection.restore(pos.best)
    return Training(spec=spec, model=model, engine=net, sampler=drawn, num_samples=num_samples, pos=pos,
                    max_steps=max_steps, build=build, wrap=wrap, unfreezing=unfreezing, d=d, selection=selection,
                    adapter=peft)


def _engine(spec: TrainingSpec, net: nn.Module, model: nn.Module, max_steps: int,
            unfreezing: layers.Unfreezing | None, *, step: int, schedule_step: int = 0, load_universal: bool = False):
    """The engine that trains `net` (`model`, or a module around it) at `step`: every parameter, or with the
    layer-wise options the layer groups that train then, each at its rate. `schedule_step`: where the schedule
    starts (a resume's checkpoint brings its own)."""
    train = spec.train
    groups = None
    if unfreezing is not None or train.layer_lr_decay != 1:
        groups = layers.optimizer_groups(layers.groups(net, model), step=step, unfreezing=unfreezing, lr=train.lr,
                                         decay=train.layer_lr_decay, weight_decay=train.weight_decay)
    return engine.initialize(net, spec, max_steps, load_universal=load_universal, groups=groups, step=schedule_step)


def _link(src: str, dst: str) -> None:
    """Hard-link `src` as `dst` (no second copy of the weights), or copy where the file system cannot."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """The torch and Python RNG states as they were before the block."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield
    random.setstate(state)
