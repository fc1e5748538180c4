"""Shared eval sets (spec.shared_evals, the manifest's `evals:`): a stage's final model scored on each set's eval
files at the stage's end, so that stages of a run compare on the same data. The launcher gives a stage only the
sets its model fits (contract.heads: a classify set to a sequence classifier, a text set to a language model);
each set is read and scored by the model's head (stages/runtime/heads/), as the head's own eval split is:

- classify: accuracy, macro_f1 and eval_loss; the set's labels are read through the model's own label2id;
- mlm: eval_loss and perplexity over masked tokens, masked as mlm's eval split is (the stage's seed and mask_prob):
  a set that is the stage's own eval file scores its own eval_loss;
- clm (and the heads built on it): eval_loss and perplexity per predicted token; each line (a document, followed by
  the end-of-document token as clm trains) is cut to the set's max_length.

Every rank runs the same forward passes (padding rows), as ZeRO-3 gathers parameters collectively; `model` may be
the module inside a ZeRO-3 engine.
"""

from __future__ import annotations

from typing import Any

from contract.heads import HEADS
from stages.runtime import data, heads
from stages.runtime.dist import Dist
from stages.runtime.spec import Spec, SpecError


def score(spec: Spec, d: Dist, model: Any, tokenizer, head: str, *, batch_size: int,
          options: dict[str, Any] | None = None) -> dict[str, float]:
    """Collective. `<set>/<metric>` for every set in spec.shared_evals, in order ({} without sets).

    `model`: a transformers model with head `head` (or what stands for one: a logits ensemble's
    `combining.AsModel`), run in eval mode; `options`: the head's settings (mlm: the stage's mask_prob)."""
    fits = HEADS[head].fits
    for name, s in spec.shared_evals.items():
        if s.task != fits:
            raise SpecError(f"evals.{name}: a {s.task} set, but this stage's model is a {head} model "
                            f"(it is scored on {fits} sets only)")
    model.eval()
    labels = heads.model_labels(head, model)  # a classifier's logits are in the order of its own labels
    out: dict[str, float] = {}
    for name, s in spec.shared_evals.items():
        source = heads.Source(data=s, tokenizer=tokenizer, tokenizer_digest=data.tokenizer_digest(spec),
                              cache_dir=spec.cache_dir, seed=spec.seed, key=f"evals.{name}", options=options or {},
                              labels=labels, eval_only=True)
        h = heads.load(head, source)
        values = h.evaluate(h.module(model), "eval", batch_size, d)
        out |= {f"{name}/{metric}": v for metric, v in values.items()}
    return out
