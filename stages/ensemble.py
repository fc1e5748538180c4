"""Combine sequence classifiers of earlier stages: a logits ensemble, a uniform soup or a greedy soup.

    python -m torch.distributed.run --nproc_per_node N -m stages.ensemble --spec spec.json

Trains nothing: no DeepSpeed engine and no checkpoints; run again, it recomputes. Every rank loads the members
one at a time and scores its share of data.eval (`data.eval_shards`); sums are all-reduced, rank 0 writes.
Each member and the ensemble get accuracy, macro-F1 and eval_loss (`member/<name>/<metric>` for the members).

- logits: the combined logits are log Σ_i w_i softmax(z_i) (`stages.runtime.ensemble.combine`); final/ holds
  ensemble.json, the tokenizer and a copy of each member's folder in members/<i>/, so it stands alone.
- uniform_soup: the average of the members' weights (same config and tensors); final/ is one model.
- greedy_soup (Wortsman et al. 2022, Recipe 1): members by held-out accuracy, best first (ties: manifest
  order); each next one stays in the soup only if the soup's accuracy on data.eval does not drop (>=). Every
  decision is a `greedy` record in metrics.jsonl and in result.json's metrics. final/ is one model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from contract.kinds.ensemble import EnsembleOptions
from contract.layout import EXIT_DONE, EXIT_STOPPED
from stages.runtime import data, dist, entry, export, heads, loop, models, records, signals
from stages.runtime import ensemble as combining
from stages.runtime.dist import Dist
from stages.runtime.masking import EVAL_EPOCH
from stages.runtime.spec import Ref, Spec, SpecError


class Members:
    """The members as the spec names them: their references, names for metrics, and loading."""

    def __init__(self, spec: Spec) -> None:
        refs = spec.inputs.get("members")
        if not isinstance(refs, list) or len(refs) < 2:
            raise SpecError(f"spec inputs.members: a list of at least 2 references is expected (kind {spec.kind})")
        self.refs: list[Ref] = refs
        self.paths: list[str] = []
        stages = [r.stage for r in refs]
        # a stage named once names its member; a repeated one, or a folder, goes by its position
        self.names = [r.stage if r.stage and stages.count(r.stage) == 1 else str(i) for i, r in enumerate(refs)]
        for i, ref in enumerate(refs):
            if ref.path is None:
                raise SpecError(f"inputs.members[{i}].path: missing (source {ref.source} gives no model)")
            models.verify_digest(f"inputs.members[{i}]", ref.path, ref.digest)
            self.paths.append(ref.path)

    def load(self, i: int):
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = self.paths[i]
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
        except (OSError, ValueError) as e:
            raise SpecError(f"inputs.members[{i}].path: {path}: cannot load a sequence classifier: {e}") from None
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise SpecError(f"inputs.members[{i}] ({self.names[i]}): {path} is not a sequence classifier: it lacks "
                            f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} (a member must be a "
                            "classify stage's output or such a folder)")
        return model.eval()


def main(spec: Spec, d: Dist) -> int:
    options = spec.options_as(EnsembleOptions)
    members = Members(spec)
    tokenizer = models.load_tokenizer(spec)
    records.start(d.world_size)
    configs = [_config(members, i) for i in range(len(members.refs))]
    names = same_labels(spec, members, configs)
    same_vocabulary(members, tokenizer)
    if options.method != "logits":
        for i in range(1, len(configs)):
            key = combining.config_difference(configs[0].to_dict(), configs[i].to_dict())
            if key is not None:
                raise SpecError(f"members {members.names[0]} and {members.names[i]} differ in config key {key!r} "
                                f"({getattr(configs[0], key, None)!r} vs {getattr(configs[i], key, None)!r}): a soup "
                                "averages the weights of one architecture")
    scorer = Scorer(spec, d, tokenizer, names, options.batch_size)
    if options.method == "greedy_soup" and not scorer.size:
        raise SpecError("data.eval_files: greedy_soup chooses its members on held-out data, and there is none")
    what = f"{options.method} of {len(members.refs)} members, {len(names)} labels"
    dist.print0(f"{spec.stage}: {what}, {scorer.size} eval samples" if scorer.size else f"{spec.stage}: {what}")

    # Every member alone, in manifest order.
    member_logits: list[torch.Tensor] = []
    scores: list[dict[str, float]] = []
    first_state: dict[str, torch.Tensor] | None = None
    for i in range(len(members.refs)):
        if _stopped():
            return EXIT_STOPPED
        model = members.load(i)
        if options.method != "logits":
            state = model.state_dict()
            first_state = first_state or state
            why = combining.state_difference(first_state, state)
            if why:
                raise SpecError(f"members {members.names[0]} and {members.names[i]} cannot be averaged: {why}")
        logits = scorer.predict(model)
        scores.append(scorer.score(logits))
        if options.method == "logits":
            member_logits.append(logits)
        del model
    per_member = {f"member/{n}/{k}": v for n, s in zip(members.names, scores, strict=True) for k, v in s.items()}

    extra: dict[str, float] = {}  # the soups': ingredients, greedy decisions
    if options.method == "logits":
        weights = options.weights or [1.0] * len(members.refs)
        values = scorer.score(combining.combine(member_logits, weights)) if scorer.size else {}
        if spec.shared_evals:  # the combined probabilities, as final/ gives them: every member in memory at once
            from stages.runtime import shared_eval

            ensemble = combining.LogitsEnsemble([members.load(i) for i in range(len(members.refs))], weights,
                                                dict(enumerate(names)))
            values |= shared_eval.score(spec, d, ensemble.members[0], tokenizer, "classify",
                                        batch_size=options.batch_size,
                                        net=lambda labels, **inputs: ensemble(**inputs)[labels != -100])
        loop.record_eval(spec, 0, values | per_member)
        path, digest = export.write_folder(spec, lambda out: _write_logits(out, members, tokenizer, weights, names))
    else:
        if _stopped():
            return EXIT_STOPPED
        if options.method == "uniform_soup":
            model, values, extra = uniform_soup(members, scorer)
        else:
            model, values, extra = greedy_soup(members, scorer, scores)
        if spec.shared_evals:
            from stages.runtime import shared_eval

            values |= shared_eval.score(spec, d, model, tokenizer, "classify", batch_size=options.batch_size)
        loop.record_eval(spec, 0, values | per_member)
        path, digest = export.save_final(model, tokenizer, spec, zero_stage=0)
    export.write_result(spec, steps=0, samples=0, output=path, digest=digest, metrics=values | per_member | extra)
    return EXIT_DONE


class Scorer:
    """This rank's share of data.eval (none without eval data) read by the classify head with the members' labels,
    its predictions and the all-reduced metrics."""

    def __init__(self, spec: Spec, d: Dist, tokenizer, names: list[str], batch_size: int) -> None:
        self.k = len(names)
        raw = data.load_raw(spec, train=False)["eval"]
        self.size = 0 if raw is None else len(raw)
        if raw is None:
            return
        source = heads.Source(data=spec.data, tokenizer=tokenizer, tokenizer_digest=data.tokenizer_digest(spec),
                              cache_dir=spec.cache_dir, seed=spec.seed, labels=names, eval_only=True)
        self.head = heads.load("classify", source)
        shards = data.eval_shards(self.size, batch_size, d.world_size, d.rank)
        real = [[i for i in batch if i >= 0] for batch in shards]  # no ZeRO here: padding rows are left out
        self.batches = [self.head.batch("eval", [(i, EVAL_EPOCH) for i in rows]) for rows in real if rows]
        labels = [b["labels"].cpu() for b in self.batches]
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)

    def predict(self, model) -> torch.Tensor:
        """The model's logits [this rank's examples, labels] (float32, on the CPU)."""
        if not self.size:
            return torch.zeros(0, self.k)
        inputs = [{k: v for k, v in batch.items() if k != "labels"} for batch in self.batches]
        with torch.no_grad():
            out = [model(**batch).logits.float().cpu() for batch in inputs]
        return torch.cat(out) if out else torch.zeros(0, self.k)

    def score(self, logits: torch.Tensor) -> dict[str, float]:
        """Collective. accuracy, macro_f1, eval_loss (mean cross-entropy) over data.eval; {} without eval data."""
        return self.head.metrics_of(self.head.sums(logits, {"labels": self.labels})) if self.size else {}


def uniform_soup(members: Members, scorer: Scorer) -> tuple[Any, dict[str, float], dict[str, float]]:
    model = members.load(0)
    soup = combining.Soup(model.state_dict())
    for i in range(1, len(members.refs)):
        soup.add(_state(members, i))
    _put(model, soup.average(), members)
    return model, scorer.score(scorer.predict(model)), {"ingredients": len(members.refs)}


def greedy_soup(members: Members, scorer: Scorer,
                scores: list[dict[str, float]]) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Collective. Recipe 1 of Wortsman et al. (2022), on data.eval: the soup and its metrics, and the decisions
    as result metrics (`greedy/<member>/accuracy`: the soup's accuracy with it; `greedy/<member>/kept`: 1 or 0)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i]["accuracy"])  # stable: ties keep manifest order
    best = order[0]
    model = members.load(best)
    soup, kept, values = combining.Soup(model.state_dict()), [members.names[best]], scores[best]
    decisions: dict[str, float] = {}

    def record(name: str, accuracy: float, keep: bool) -> None:
        records.log("greedy", member=name, accuracy=accuracy, kept=keep, ingredients=list(kept))
        decisions.update({f"greedy/{name}/accuracy": accuracy, f"greedy/{name}/kept": float(keep)})
        dist.print0(f"greedy soup: {name} {'kept' if keep else 'left out'} (held-out accuracy {accuracy:.4f} with it)")

    record(members.names[best], values["accuracy"], True)
    for i in order[1:]:
        state = _state(members, i)
        _put(model, soup.average(extra=state), members)
        candidate = scorer.score(scorer.predict(model))
        keep = candidate["accuracy"] >= values["accuracy"]
        if keep:
            soup.add(state)
            kept.append(members.names[i])
            values = candidate
        record(members.names[i], candidate["accuracy"], keep)
    _put(model, soup.average(), members)  # the last candidate may have been left out
    return model, values, decisions | {"ingredients": len(kept)}


def _state(members: Members, i: int) -> dict[str, torch.Tensor]:
    return members.load(i).state_dict()  # its config and tensors were checked against the first member's


def _put(model, state: dict[str, torch.Tensor], members: Members) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SpecError(f"the members cannot be averaged: {e}") from None


def same_labels(spec: Spec, members: Members, configs: list[Any]) -> list[str]:
    """The members' label names in id order, which must be one list (and data.labels, where given)."""
    lists = [[str(c.id2label[i]) for i in range(c.num_labels)] for c in configs]
    for i, names in enumerate(lists[1:], 1):
        if names != lists[0]:
            raise SpecError(f"members {members.names[0]} and {members.names[i]} have other labels ({lists[0]} vs "
                            f"{names}): an ensemble combines classifiers of one label set, in one order")
    given = spec.data.labels
    if given is not None and [str(x) for x in given] != lists[0]:
        raise SpecError(f"data.labels {given} are not the members' labels {lists[0]} (in id order)")
    return lists[0]


def same_vocabulary(members: Members, tokenizer) -> None:
    """Every member that saved a tokenizer must have the stage's vocabulary: one batch feeds them all."""
    from transformers import AutoTokenizer

    for i, path in enumerate(members.paths):
        try:
            own = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            continue  # a folder with weights only
        why = models.vocabulary_difference(own, tokenizer)
        if why:
            raise SpecError(f"inputs.members[{i}] ({members.names[i]}): the stage's tokenizer is not this member's: "
                            f"{why}; every member reads the same batch")


def _config(members: Members, i: int):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(members.paths[i])
    except (OSError, ValueError) as e:
        raise SpecError(f"inputs.members[{i}].path: {members.paths[i]}: no model config: {e}") from None


def _stopped() -> bool:
    """Collective: whether any rank got a stop request. Nothing is saved: a rerun recomputes (exit 75)."""
    if not dist.any_rank(signals.received()):
        return False
    records.log("stop", step=0, reason="signal")
    dist.print0("stopped on a signal; nothing saved, exit 75 (running it again recomputes the ensemble)")
    return True


def _write_logits(tmp: Path, members: Members, tokenizer, weights: list[float], names: list[str]) -> None:
    """Rank 0: final/ of a logits ensemble, into `tmp`: the members copied in, ensemble.json, the tokenizer."""
    shares = combining.normalised(weights)
    listed = []
    for i, ref in enumerate(members.refs):
        shutil.copytree(members.paths[i], tmp / "members" / str(i))
        listed.append({"name": members.names[i], "source": ref.source, "stage": ref.stage, "digest": ref.digest,
                       "path": f"members/{i}", "weight": shares[i], "weight_given": weights[i]})
    export.save_tokenizer(tokenizer, tmp)
    manifest = {"format": combining.FORMAT, "method": "logits", "combine": "mean of probabilities",
                "members": listed, "labels": names}
    (tmp / combining.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    entry.run(main)
