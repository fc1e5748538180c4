"""The life of a training stage: `start` (the set-up every stage runs, in the one order that resumes
exactly), `Training.fit` (the loop) and `Training.finish` (final eval, export, result).

A stage script keeps only what is its own: its data and batches, its loss, its eval.

    t = lifecycle.start(spec, d, num_samples=len(train), build=..., what="mlm, 4000 samples")
    if t.fit(micro_step, evaluate):
        return EXIT_STOPPED
    return t.finish(evaluate, tokenizer)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from contract.layout import EXIT_DONE
from stages.runtime import checkpoint, dist, engine, export, loop, models
from stages.runtime.checkpoint import Position
from stages.runtime.data import StreamSampler
from stages.runtime.dist import Dist
from stages.runtime.loop import Evaluate, MicroStep
from stages.runtime.metrics import Metrics
from stages.runtime.spec import Spec, training


@dataclass
class Training:
    spec: Spec
    model: nn.Module  # the transformers model: what final/ saves
    engine: nn.Module  # the DeepSpeed engine; wraps `model`, or a loss module around it
    sampler: StreamSampler  # this rank's micro-batches from the current position on
    pos: Position
    max_steps: int
    metrics: Metrics

    def fit(self, micro_step: MicroStep, evaluate: Evaluate) -> bool:
        """Train to max_steps; True when a signal stopped it (a checkpoint is saved: exit 75)."""
        stopped, self.pos = loop.fit(self.engine, self.spec, self.sampler, micro_step, evaluate, pos=self.pos,
                                     max_steps=self.max_steps, metrics=self.metrics)
        return stopped

    def finish(self, evaluate: Evaluate, tokenizer) -> int:
        """Collective. The final eval (if eval.at_end), final/ (model + tokenizer), then result.json."""
        spec = self.spec
        final_metrics: dict[str, float] = {}
        if training(spec).eval.at_end:
            final_metrics = evaluate(self.pos.step)
            loop.record_eval(spec, self.metrics, self.pos.step, final_metrics)
        path, digest = export.save_final(self.model, tokenizer, spec, zero_stage=engine.zero_stage(spec))
        export.write_result(spec, steps=self.pos.step, samples=self.pos.samples, output=path, digest=digest,
                            metrics=final_metrics)
        return EXIT_DONE


def start(spec: Spec, d: Dist, *, num_samples: int, build: Callable[[bool], nn.Module],
          wrap: Callable[[nn.Module], nn.Module] | None = None, what: str) -> Training:
    """Collective. Set up a training stage, in the order that makes a resumed run follow an unbroken one.

    1. Find the newest complete checkpoint *before* building: resume beats init, so on resume
       `build(True)` makes only the architecture and the checkpoint brings the weights.
    2. Build the model (`build(resume)`, seeded alike on every rank) and `wrap` it (a loss module).
    3. deepspeed.initialize, with the schedule as a LambdaLR so checkpoints hold it.
    4. Seed dropout per rank *after* initialize (which draws from the RNG).
    5. Load the checkpoint: weights, optimizer, schedule, this rank's RNG and the data position.
    """
    train = training(spec).train
    max_steps = engine.max_steps(train, num_samples)
    tag = checkpoint.find_latest(spec)
    model = build(tag is not None)
    net = engine.initialize(wrap(model) if wrap else model, spec, max_steps)
    models.seed_dropout(spec, d.rank)
    pos = checkpoint.load(net, spec, tag) if tag else Position(step=0, samples=0)
    dist.print0(f"{spec.stage}: {what}, {max_steps} steps, ZeRO-{engine.zero_stage(spec)}"
                + (f", resuming from {tag}" if tag else ""))
    sampler = StreamSampler(
        num_samples, seed=spec.seed, micro_batch=train.micro_batch_size, grad_accum=train.grad_accum,
        world_size=d.world_size, rank=d.rank, samples=pos.samples,
    )
    metrics = Metrics(spec.stage_dir, max_steps)
    metrics.start(pos.step, d.world_size)
    return Training(spec=spec, model=model, engine=net, sampler=sampler, pos=pos, max_steps=max_steps, metrics=metrics)
