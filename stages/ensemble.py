"""Combine models of earlier stages with one head (ensemble.task): a logits ensemble, a uniform or greedy soup, a
task-vector merge (task_arithmetic, ties, dare) or a slerp.

    python -m torch.distributed.run --nproc_per_node N -m stages.ensemble --spec spec.json

Trains nothing: no DeepSpeed engine and no checkpoints; run again, it recomputes. Every rank loads the members
one at a time and scores its share of data.eval (`data.eval_shards`) as the task's head reads and scores it; sums
are all-reduced, rank 0 writes. Each member and the ensemble get the head's metrics (`member/<name>/<metric>` for
the members, `base/<metric>` for a merge's base).

- logits: the combined logits are log Σ_i w_i softmax(z_i) (`stages.runtime.ensemble.combine`), for a causal LM
  per predicted token (its eval loss and perplexity; no generation); final/ holds ensemble.json, the tokenizer and
  a copy of each member's folder in members/<i>/, so it stands alone.
- uniform_soup: the average of the members' weights (same config and tensors); final/ is one model.
- greedy_soup (Wortsman et al. 2022, Recipe 1): members by held-out accuracy, best first (ties: manifest
  order); each next one stays in the soup only if the soup's accuracy on data.eval does not drop (>=). Every
  decision is a `greedy` record in metrics.jsonl and in result.json's metrics. final/ is one model.
- task_arithmetic, ties, dare (against `base`), slerp (two members): `stages.runtime.merging`, as mergekit merges;
  DARE's draws are seeded by the stage's seed. final/ is one model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from contract.heads import HEADS
from contract.kinds.ensemble import TASK_VECTORS, EnsembleOptions
from contract.layout import EXIT_DONE, EXIT_STOPPED
from stages.runtime import data, dist, entry, export, heads, loop, merging, models, records, signals
from stages.runtime import ensemble as combining
from stages.runtime.dist import Dist
from stages.runtime.heads import common
from stages.runtime.spec import Ref, Spec, SpecError


class Members:
    """The models an input names (`members`, or a merge's `base`): references, names for metrics, loading with the
    task's model class."""

    def __init__(self, spec: Spec, task: str, key: str = "members") -> None:
        refs = spec.inputs.get(key)
        refs = [refs] if isinstance(refs, Ref) else refs
        if not isinstance(refs, list) or not refs or (key == "members" and len(refs) < 2):
            raise SpecError(f"spec inputs.{key}: missing (kind {spec.kind}, method "
                            f"{spec.options.get('method')} needs it)")
        self.task, self.key, self.refs = task, key, refs
        self.paths: list[str] = []
        stages = [r.stage for r in refs]
        # a stage named once names its member; a repeated one, or a folder, goes by its position
        self.names = [r.stage if r.stage and stages.count(r.stage) == 1 else str(i) for i, r in enumerate(refs)]
        for i, ref in enumerate(refs):
            if ref.path is None:
                raise SpecError(f"inputs.{key}[{i}].path: missing (source {ref.source} gives no model)")
            models.verify_digest(f"inputs.{key}[{i}]", ref.path, ref.digest)
            self.paths.append(ref.path)

    def load(self, i: int):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path, what = self.paths[i], HEADS[self.task].model
        try:
            model, info = heads.auto(self.task).from_pretrained(path, output_loading_info=True)
        except (OSError, ValueError) as e:
            raise SpecError(f"inputs.{self.key}[{i}].path: {path}: cannot load it as {what}: {e}") from None
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise SpecError(f"inputs.{self.key}[{i}] ({self.names[i]}): {path} is not a {self.task} model "
                            f"({what}): it lacks {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} (it "
                            f"must be the output of a stage with head {self.task}, or such a folder)")
        return model.eval()


def main(spec: Spec, d: Dist) -> int:
    options = spec.options_as(EnsembleOptions)
    members = Members(spec, options.task)
    base = Members(spec, options.task, "base") if options.method in TASK_VECTORS else None
    tokenizer = models.load_tokenizer(spec)
    records.start(d.world_size)
    configs = [_config(members, i) for i in range(len(members.refs))]
    names = same_labels(spec, members, configs) if HEADS[options.task].classes == "num_labels" else None
    same_vocabulary(members, tokenizer)
    if options.method != "logits":
        others = [(members, i) for i in range(1, len(members.refs))] + ([(base, 0)] if base else [])
        for group, i in others:
            config = configs[i] if group is members else _config(group, i)
            key = combining.config_difference(configs[0].to_dict(), config.to_dict())
            if key is not None:
                raise SpecError(f"member {members.names[0]} and {'member' if group is members else 'base'} "
                                f"{group.names[i]} differ in config key "
                                f"{key!r} ({getattr(configs[0], key, None)!r} vs {getattr(config, key, None)!r}): "
                                f"{options.method} combines the weights of one architecture")
    scorer = Scorer(spec, d, tokenizer, names, options)
    if options.method == "greedy_soup" and not scorer.size:
        raise SpecError("data.eval_files: greedy_soup chooses its members on held-out data, and there is none")
    what = f"{options.method} of {len(members.refs)} {options.task} members"
    dist.print0(f"{spec.stage}: {what}, {scorer.size} eval samples" if scorer.size else f"{spec.stage}: {what}")

    # Every member alone, in manifest order (and a merge's base).
    member_rows: list[list[torch.Tensor]] = []
    scores: list[dict[str, float]] = []
    states: list[dict[str, torch.Tensor]] = []
    for i in range(len(members.refs)):
        if _stopped():
            return EXIT_STOPPED
        model = members.load(i)
        if options.method == "logits":
            member_rows.append(scorer.rows(model))
            scores.append(scorer.score(member_rows[-1]))
        else:
            states.append(_checked(model.state_dict(), states, members, i))
            scores.append(scorer.evaluate(model))
        del model
    per_member = {f"member/{n}/{k}": v for n, s in zip(members.names, scores, strict=True) for k, v in s.items()}
    base_state = None
    if base is not None:
        model = base.load(0)
        base_state = _checked(model.state_dict(), states, base, 0)
        per_member |= {f"base/{k}": v for k, v in scorer.evaluate(model).items()}
        del model
    if _stopped():
        return EXIT_STOPPED

    extra: dict[str, float] = {}  # the soups': ingredients, greedy decisions
    weights = options.weights or [1.0] * len(members.refs)
    if options.method == "logits":
        values = scorer.score([combining.combine(rows, weights) for rows in zip(*member_rows, strict=True)]) \
            if scorer.size else {}
        if spec.shared_evals:  # the combined probabilities, as final/ gives them: every member in memory at once
            from stages.runtime import shared_eval

            ensemble = combining.LogitsEnsemble([members.load(i) for i in range(len(members.refs))], weights,
                                                dict(enumerate(names or [])))
            values |= shared_eval.score(spec, d, combining.AsModel(ensemble), tokenizer, options.task,
                                        batch_size=options.batch_size, options=options.head_options())
        loop.record_eval(spec, 0, values | per_member)
        path, digest = export.write_folder(
            spec, lambda out: _write_logits(out, members, tokenizer, weights, names, options.task))
    else:
        if options.method == "uniform_soup":
            model, values, extra = uniform_soup(members, scorer, states)
        elif options.method == "greedy_soup":
            model, values, extra = greedy_soup(members, scorer, scores, states)
        else:
            model = members.load(0)
            _put(model, merge(options, states, base_state, spec.seed))
            values = scorer.evaluate(model)
        if spec.shared_evals:
            from stages.runtime import shared_eval

            values |= shared_eval.score(spec, d, model, tokenizer, options.task, batch_size=options.batch_size,
                                        options=options.head_options())
        loop.record_eval(spec, 0, values | per_member)
        path, digest = export.save_final(model, tokenizer, spec, zero_stage=0)
    export.write_result(spec, steps=0, samples=0, output=path, digest=digest, metrics=values | per_member | extra)
    return EXIT_DONE


class Scorer:
    """This rank's share of data.eval (none without eval data), read by the task's head (a classifier's with the
    members' labels): each model's metrics as the head evaluates it, and the metrics of rows of logits (a logits
    ensemble's combined ones)."""

    def __init__(self, spec: Spec, d: Dist, tokenizer, names: list[str] | None, options: EnsembleOptions) -> None:
        self.d, self.batch_size = d, options.batch_size
        raw = data.load_raw(spec, train=False)["eval"]
        self.size = 0 if raw is None else len(raw)
        if raw is None:
            return
        source = heads.Source(data=spec.data, tokenizer=tokenizer, tokenizer_digest=data.tokenizer_digest(spec),
                              cache_dir=spec.cache_dir, seed=spec.seed, options=options.head_options(), labels=names,
                              train=False)
        self.head = heads.load(options.task, source)
        self.batches = list(common.shards(self.head, "eval", self.batch_size, d))

    def evaluate(self, model) -> dict[str, float]:
        """Collective. The head's metrics of `model` on data.eval ({} without eval data)."""
        return self.head.evaluate(self.head.module(model), "eval", self.batch_size, self.d) if self.size else {}

    def rows(self, model) -> list[torch.Tensor]:
        """The model's rows of logits of each of this rank's batches (float32, on the CPU)."""
        if not self.size:
            return []
        net = self.head.module(model)
        with torch.no_grad():
            return [net(**batch).float().cpu() for batch in self.batches]

    def score(self, rows: list[torch.Tensor]) -> dict[str, float]:
        """Collective. The head's metrics of these rows (one tensor per batch, as `rows` gives them); {} without
        eval data."""
        if not self.size:
            return {}
        sums = [self.head.sums(r.to(b["labels"].device), b) for r, b in zip(rows, self.batches, strict=True)]
        return self.head.metrics_of(torch.stack(sums).sum(0))


def merge(options: EnsembleOptions, states: list[dict[str, torch.Tensor]], base: dict[str, torch.Tensor] | None,
          seed: int) -> dict[str, torch.Tensor]:
    """The merged state dict, mergekit's defaults where the manifest leaves a setting out."""
    n = len(states)
    try:
        return merging.merge(options.method, states, base, weights=options.weights or [1.0] * n,
                             densities=options.densities or [1.0] * n,
                             normalize=options.method == "ties" if options.normalize is None else options.normalize,
                             rescale=options.method == "dare" if options.rescale is None else options.rescale,
                             t=0.5 if options.t is None else options.t, seed=seed)
    except ValueError as e:
        raise SpecError(f"the members cannot be merged: {e}") from None


def uniform_soup(members: Members, scorer: Scorer,
                 states: list[dict[str, torch.Tensor]]) -> tuple[Any, dict[str, float], dict[str, float]]:
    model = members.load(0)
    soup = combining.Soup(states[0])
    for state in states[1:]:
        soup.add(state)
    _put(model, soup.average())
    return model, scorer.evaluate(model), {"ingredients": len(members.refs)}


def greedy_soup(members: Members, scorer: Scorer, scores: list[dict[str, float]],
                states: list[dict[str, torch.Tensor]]) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Collective. Recipe 1 of Wortsman et al. (2022), on data.eval: the soup and its metrics, and the decisions
    as result metrics (`greedy/<member>/accuracy`: the soup's accuracy with it; `greedy/<member>/kept`: 1 or 0)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i]["accuracy"])  # stable: ties keep manifest order
    best = order[0]
    model = members.load(best)
    soup, kept, values = combining.Soup(states[best]), [members.names[best]], scores[best]
    decisions: dict[str, float] = {}

    def record(name: str, accuracy: float, keep: bool) -> None:
        records.log("greedy", member=name, accuracy=accuracy, kept=keep, ingredients=list(kept))
        decisions.update({f"greedy/{name}/accuracy": accuracy, f"greedy/{name}/kept": float(keep)})
        dist.print0(f"greedy soup: {name} {'kept' if keep else 'left out'} (held-out accuracy {accuracy:.4f} with it)")

    record(members.names[best], values["accuracy"], True)
    for i in order[1:]:
        _put(model, soup.average(extra=states[i]))
        candidate = scorer.evaluate(model)
        keep = candidate["accuracy"] >= values["accuracy"]
        if keep:
            soup.add(states[i])
            kept.append(members.names[i])
            values = candidate
        record(members.names[i], candidate["accuracy"], keep)
    _put(model, soup.average())  # the last candidate may have been left out
    return model, values, decisions | {"ingredients": len(kept)}


def _checked(state: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], models_: Members,
             i: int) -> dict[str, torch.Tensor]:
    """`state`, once its tensors are known to match the first member's (names, shapes, dtypes)."""
    why = combining.state_difference(states[0], state) if states else None
    if why:
        raise SpecError(f"{models_.key} {models_.names[i]} cannot be combined with the first member's weights: {why}")
    return state


def _put(model, state: dict[str, torch.Tensor]) -> None:
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
        raise SpecError(f"inputs.{members.key}[{i}].path: {members.paths[i]}: no model config: {e}") from None


def _stopped() -> bool:
    """Collective: whether any rank got a stop request. Nothing is saved: a rerun recomputes (exit 75)."""
    if not dist.any_rank(signals.received()):
        return False
    records.log("stop", step=0, reason="signal")
    dist.print0("stopped on a signal; nothing saved, exit 75 (running it again recomputes the ensemble)")
    return True


def _write_logits(tmp: Path, members: Members, tokenizer, weights: list[float], names: list[str] | None,
                  task: str) -> None:
    """Rank 0: final/ of a logits ensemble, into `tmp`: the members copied in, ensemble.json, the tokenizer."""
    shares = combining.normalised(weights)
    listed = []
    for i, ref in enumerate(members.refs):
        shutil.copytree(members.paths[i], tmp / "members" / str(i))
        listed.append({"name": members.names[i], "source": ref.source, "stage": ref.stage, "digest": ref.digest,
                       "path": f"members/{i}", "weight": shares[i], "weight_given": weights[i]})
    export.save_tokenizer(tokenizer, tmp)
    manifest = {"format": combining.FORMAT, "method": "logits", "task": task, "combine": "mean of probabilities",
                "members": listed, "labels": names}
    (tmp / combining.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    entry.run(main)
