"""The training loop every stage shares: a function, so stage scripts read top to bottom."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from stages.runtime import checkpoint, dist, records, signals, speed
from stages.runtime.best import Selection
from stages.runtime.checkpoint import Position
from stages.runtime.engine import current_lr
from stages.runtime.layers import Unfreezing
from stages.runtime.spec import Diverged, Spec, TrainingSpec
from stages.runtime.speed import Flops

# A micro-batch's loss, or (loss, its terms by name: logged as a `loss_terms` record, each term the mean over the
# micro-batches that had it: deep supervision's per-layer losses, distillation's parts, multitask's per-task losses)
MicroStep = Callable[[list[tuple[int, int]]], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]
Evaluate = Callable[[int], dict[str, float]]


class Sampler(Protocol):
    """This rank's micro-batches, step by step (`data.StreamSampler`, a curriculum's, multitask's mixing)."""

    samples: int  # samples drawn by all ranks so far: the data position a checkpoint saves
    max_length: int | None  # tokens per example for the step just drawn (a curriculum phase's cap), or None

    def next_step(self) -> list[list[tuple[int, int]]]: ...


def fit(engine, spec: TrainingSpec, sampler: Sampler, micro_step: MicroStep, evaluate: Evaluate, *,
        pos: Position, max_steps: int, flops: Flops | None = None, unfreezing: Unfreezing | None = None,
        renew: Callable[[Position], Any] | None = None, selection: Selection | None = None,
        keep: Callable[[int], None] | None = None) -> tuple[bool, Position]:
    """Train from `pos` to `max_steps`. Returns (stopped by a signal, position reached).

    `micro_step(items)` returns the loss of one micro-batch of (index, epoch)
    items; `evaluate(step)` is collective and returns metrics. Checkpoints
    every `checkpoint.every_steps` and on a stop request, then returns at once.
    `flops`: the model's FLOPs estimate, for the train records' mfu on a GPU.
    With `unfreezing`, each new phase trains on the engine `renew(pos)` makes, from a checkpoint of its own.
    With `selection` (eval.best), each eval is counted and `keep(step)` (collective) keeps the model of a new
    best; the eval then comes before the step's checkpoint (even on a stop request), so the checkpoint holds the
    selection after it. Early stopping (eval.patience) saves a checkpoint and returns (not stopped by a signal).
    """
    rates = speed.RateWindow(max_steps, flops=flops, peak_flops=speed.peak_flops(spec.precision))
    every_ckpt, every_eval = spec.checkpoint.every_steps, spec.eval.every_steps
    start = step = pos.step
    # Since the last log line, on the device (read back only at log lines): the loss sum, the loss terms' sums
    # and the tokens (tokens.take()); on the host: the micro-batch count, and each term's. Every rank has the same
    # terms in the same order (they depend on the step, not on the rank's rows), so their sums reduce together.
    device = dist.device()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    micro_batches = 0
    terms: dict[str, torch.Tensor] = {}
    term_counts: dict[str, int] = {}
    tokens = speed.TokenCounter(engine.module)
    nonfinite_run = 0  # consecutive steps with a NaN or infinite loss on some rank
    engine.train()
    while step < max_steps and not (selection and selection.exhausted):  # a resume after an early stop: done
        losses = []
        for items in sampler.next_step():
            loss, named = _terms(micro_step(items))
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
            for name, value in named.items():
                terms[name] = terms.get(name, 0.0) + value.detach().double()
                term_counts[name] = term_counts.get(name, 0) + 1
        step_losses = torch.stack(losses).double()
        loss_sum += step_losses.sum()
        micro_batches += len(losses)
        step += 1
        # One collective a step, so every rank decides alike: a signal may reach only some ranks, a non-finite
        # loss may show on only some. Its read-back is the step's one wait on the device.
        flags = torch.stack([torch.tensor(float(signals.received()), dtype=torch.float64, device=device),
                             (~torch.isfinite(step_losses)).any().double()])
        stop_flag, nonfinite = dist.all_reduce_sum(flags).tolist()
        nonfinite_run = nonfinite_run + 1 if nonfinite else 0
        if step == start + 1:
            rates.first_step(step)
            tokens.take(device)  # rates are measured from the end of the first step (its warm-up left out)
        if step % spec.train.log_every == 0 or step == max_steps:
            counts = torch.stack([loss_sum, torch.tensor(float(micro_batches), dtype=torch.float64, device=device),
                                  *tokens.take(device), *terms.values(),
                                  *(torch.tensor(float(n), dtype=torch.float64, device=device)
                                    for n in term_counts.values())])
            total = dist.all_reduce_sum(counts).tolist()
            rates.train(step, sampler.samples, total[0] / total[1], current_lr(engine), tokens=total[2],
                        rows=total[3])
            if terms:
                sums, seen = total[4:4 + len(terms)], total[4 + len(terms):]
                records.log("loss_terms", step=step, terms={k: v / n for k, v, n in zip(terms, sums, seen)})
            loss_sum.zero_()
            micro_batches = 0
            terms.clear()
            term_counts.clear()
        if nonfinite_run >= spec.train.stop_after_nonfinite:
            records.log("stop", step=step, reason="non-finite loss")
            raise Diverged(f"the loss was NaN or infinite for {nonfinite_run} consecutive steps (up to step {step}); "
                           "nothing is exported. Check train.lr and the data (e.g. empty documents); "
                           "train.stop_after_nonfinite sets how many such steps are tolerated")
        due = every_eval and step % every_eval == 0 and step < max_steps
        if due and selection is not None:
            values = evaluate(step)
            record_eval(spec, step, values)
            if selection.see(step, values):
                assert keep is not None, "a selection comes with keep"
                keep(step)
            engine.train()
            due = False
        early = selection is not None and selection.exhausted
        pos = Position(step=step, samples=sampler.samples, best=selection.state() if selection else None)
        new_phase = unfreezing is not None and unfreezing.starts_phase(step) and step < max_steps and not early
        if new_phase:
            assert renew is not None, "unfreezing comes with renew"
            # Gradual unfreezing: DeepSpeed fixes the trainable set at initialize, so the phase gets an engine of
            # its own, and a checkpoint of it at once (a resume in this phase loads into the same engine)
            engine = renew(pos)
            tokens.attach(engine.module)
            engine.train()
        stop = bool(stop_flag)
        if stop or early or new_phase or (every_ckpt and step % every_ckpt == 0 and step < max_steps):
            tag = checkpoint.save(engine, spec, pos)
            records.log("checkpoint", step=step, tag=tag)
        if stop:
            records.log("stop", step=step, reason="signal")
            dist.print0(f"stopped on a signal at step {step}; checkpoint saved, exit 75")
            return True, pos
        if early:
            assert selection is not None
            records.log("stop", step=step, reason=selection.reason())
            dist.print0(f"{selection.reason()}; stopped at step {step}")
            return False, pos
        if due:
            record_eval(spec, step, evaluate(step))
            engine.train()
    return False, pos


def record_eval(spec: Spec, step: int, values: dict[str, float]) -> None:
    from contract.files import json_safe, write_json

    if not values:  # no eval data
        return
    records.log("eval", step=step, **values)
    if dist.is_main():
        write_json(f"{spec.stage_dir}/eval.json", json_safe({"step": step, **values}))
        dist.print0("eval " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))


def _terms(out: torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})
