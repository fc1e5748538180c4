"""Structured pruning (stages/runtime/pruning.py): rank FFN neurons, kv-head groups and layers, keep the best,
and hand on a smaller `save_pretrained` model.

    python -m torch.distributed.run --nproc_per_node N -m stages.prune --spec spec.json

Nothing is trained, so there is no DeepSpeed engine: every rank holds the whole model (as for inference), scores
a share of the calibration batches, and the score sums are all-reduced, so every rank cuts alike. The eval split
is scored before and after the cut (sharded over the ranks). final/ holds the pruned model, the tokenizer and
pruning.json (what was kept); result.json's metrics hold both evals and the parameter counts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from contract.files import write_json
from contract.heads import HEADS
from contract.kinds.prune import PruneOptions
from contract.layout import EXIT_DONE, EXIT_STOPPED
from stages.runtime import data, dist, entry, export, heads, loop, models, pruning, records, signals
from stages.runtime.dist import Dist
from stages.runtime.spec import Spec, SpecError


def main(spec: Spec, d: Dist) -> int:
    opts = spec.options_as(PruneOptions)
    records.start(d.world_size)
    tokenizer = models.load_tokenizer(spec)
    init = spec.ref("init")
    if init.path is None:
        raise SpecError("inputs.init.path: missing (prune needs a trained model)")
    models.verify_digest("inputs.init", init.path, init.digest)
    model = heads.auto(opts.task).from_pretrained(init.path).eval()
    f = pruning.family_of(model)
    shape = pruning.shape_of(model, f)
    if opts.heads is not None and not f.heads:
        raise SpecError(f"prune.heads: a {model.config.model_type} model derives its head size from the hidden "
                        "size, so it cannot keep fewer heads of the same size (models whose config states head_dim "
                        "can: llama, qwen2, mistral); prune ffn and layers instead")
    if opts.layers is not None and opts.layers > shape.layers:
        raise SpecError(f"prune.layers: {opts.layers} but the model has {shape.layers} layers")
    head_options = {name: getattr(opts, name) for name in HEADS[opts.task].options}
    head = heads.of(spec, opts.task, tokenizer, labels=heads.model_labels(opts.task, model), **head_options)

    def evaluate(model) -> dict[str, float]:
        """Collective. The eval split's metrics under `model` ({} without one)."""
        return head.evaluate(head.module(model), "eval", opts.micro_batch_size, d)

    before = evaluate(model)
    params_before = models.parameter_count(model)
    if opts.calibrates:
        calibration = pruning.Calibration(model, f, opts.importance)
        with calibration:
            for indices in calibration_batches(spec, opts, len(head.splits["train"]), d):
                batch = head.batch("train", [(i, 0) for i in indices])

                def run(batch=batch, model=model):
                    """The forward pass: (loss, hidden states)."""
                    out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
                    return head.loss(head.select(out.logits, batch), batch), out.hidden_states

                calibration.batch(batch["attention_mask"], run)
                if dist.any_rank(signals.received()):
                    records.log("stop", step=0, reason="signal")
                    return EXIT_STOPPED  # nothing written: a rerun prunes from the start
        scores = calibration.scores
        for t in scores.tensors():
            dist.all_reduce_sum(t)
        if opts.importance == "magnitude":  # the calibration ranked the layers; the weights rank the rest
            by_weight = pruning.magnitude(model, f)
            scores.ffn, scores.groups = by_weight.ffn, by_weight.groups
    else:
        scores = pruning.magnitude(model, f)
    plan = pruning.plan(scores, ffn=opts.ffn, heads=opts.heads, layers=opts.layers)
    pruned = pruning.apply(model, f, plan)
    del model
    after = evaluate(pruned)
    params_after = models.parameter_count(pruned)
    kept = {"layers": len(plan.layers), "ffn": len(plan.ffn[0]),
            "heads": len(plan.groups[0]) * (shape.heads // max(shape.kv_heads, 1)) if f.heads else None}
    record = {"before": {"layers": shape.layers, "ffn": shape.ffn, "heads": shape.heads or None,
                         "parameters": params_before, **before},
              "after": {**kept, "parameters": params_after, **after},
              "importance": opts.importance, "kept": plan.as_json()}
    records.log("prune", **{k: v for k, v in record.items() if k != "kept"})
    dist.print0(f"{spec.stage}: {params_before:,} → {params_after:,} parameters "
                f"({shape.layers}→{kept['layers']} layers, FFN {shape.ffn}→{kept['ffn']}"
                + (f", heads {shape.heads}→{kept['heads']}" if f.heads else "") + ")"
                + "".join(f"; {k} {before[k]:.4f} → {after[k]:.4f}" for k in after))
    shared: dict[str, float] = {}
    if spec.shared_evals:
        from stages.runtime import shared_eval

        shared = shared_eval.score(spec, d, pruned, tokenizer, opts.task, batch_size=opts.micro_batch_size,
                                   options=head_options)
    loop.record_eval(spec, 0, after | shared)

    def fill(out: Path) -> None:
        pruned.save_pretrained(out, safe_serialization=True)
        export.save_tokenizer(tokenizer, out)
        write_json(out / "pruning.json", record)

    path, digest = export.write_folder(spec, fill)
    results = {**after, **shared, **{f"before/{k}": v for k, v in before.items()},
               "params_before": float(params_before), "params_after": float(params_after)}
    export.write_result(spec, steps=0, samples=0, output=path, digest=digest, metrics=results)
    return EXIT_DONE


def calibration_batches(spec: Spec, opts: PruneOptions, n: int, d: Dist) -> list[list[int]]:
    """This rank's calibration batches: a seeded sample of the train split, strided over the ranks."""
    g = torch.Generator().manual_seed(data.seed_of(spec.seed, "calibration"))
    sample = torch.randperm(n, generator=g)[: opts.calibration_batches * opts.micro_batch_size * d.world_size]
    mine = sample[d.rank:: d.world_size].tolist()
    return [mine[i: i + opts.micro_batch_size] for i in range(0, len(mine), opts.micro_batch_size)]


if __name__ == "__main__":
    entry.run(main)
