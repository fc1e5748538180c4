"""Shared eval sets (spec.shared_evals, the manifest's `evals:`): a stage's final model scored on each set's eval
files at the stage's end, so that stages of a run compare on the same data. The launcher gives a stage only the
sets its model fits: a classify set to a sequence classifier, a text set to a masked or causal LM.

- classify: accuracy, macro_f1 and eval_loss; the set's labels are read through the model's own label2id.
- text, masked LM: eval_loss and perplexity over masked tokens, masked as mlm's eval split is (`Masker`,
  EVAL_EPOCH, the stage's seed and mask_prob): a set that is the stage's own eval file scores its own eval_loss.
- text, causal LM: eval_loss and perplexity per predicted token; each line (document, followed by the
  end-of-document token as clm trains) is cut to the set's max_length, and batches pad on the right.

Every rank runs the same forward passes (`data.eval_shards`' padding rows), as ZeRO-3 gathers parameters
collectively; `model` may be the module inside a ZeRO-3 engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from contract.spec import SharedEvalSpec
from stages.runtime import data, dist, evaluation
from stages.runtime.dist import Dist
from stages.runtime.masking import EVAL_EPOCH, MaskedLMLoss, Masker
from stages.runtime.packing import end_of_document
from stages.runtime.spec import Spec, SpecError

Task = Literal["classify", "mlm", "clm"]  # the model's head
Logits = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # a collated batch (on the device) → [rows, labels]
_FITS = {"classify": "classify", "mlm": "text", "clm": "text"}  # the set task each head is scored on


def score(spec: Spec, d: Dist, model: Any, tokenizer, task: Task, *, batch_size: int, mask_prob: float = 0.15,
          logits_of: Logits | None = None) -> dict[str, float]:
    """Collective. `<set>/<metric>` for every set in spec.shared_evals, in order ({} without sets).

    `model`: a transformers model with head `task`, run in eval mode; `mask_prob`: task mlm's masking rate (the
    stage's own). `logits_of(batch)`: task classify's logits in place of `model(**batch).logits` (a logits
    ensemble's combined ones; `model`, one of its members, then gives the labels)."""
    for name, s in spec.shared_evals.items():
        if s.task != _FITS[task]:
            raise SpecError(f"evals.{name}: a {s.task} set, but this stage's model is a {task} model "
                            f"(it is scored on {_FITS[task]} sets only)")
    model.eval()
    out: dict[str, float] = {}
    for name, s in spec.shared_evals.items():
        key = f"evals.{name}"
        raw = data.load_eval(s, spec.cache_dir, key)
        if task == "classify":
            values = _classify(spec, d, key, s, raw, model, tokenizer, batch_size, logits_of)
        elif task == "mlm":
            values = _masked(spec, d, s, raw, model, tokenizer, batch_size, mask_prob)
        else:
            values = _causal(spec, d, key, s, raw, model, tokenizer, batch_size)
        out |= {f"{name}/{metric}": v for metric, v in values.items()}
    return out


def _classify(spec: Spec, d: Dist, key: str, s: SharedEvalSpec, raw, model, tokenizer, batch_size: int,
              logits_of: Logits | None) -> dict[str, float]:
    config = model.config
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    if s.labels is not None and [str(x) for x in s.labels] != names:
        raise SpecError(f"{key}.labels: {s.labels} are not the model's labels {names} (in id order)")
    label2id = {str(label): int(i) for label, i in config.label2id.items()}
    if s.label_field not in raw.column_names:
        raise SpecError(f"{key}.label_field: column {s.label_field!r} not in {s.eval_files or 'the eval split'} "
                        f"(columns: {raw.column_names})")
    unknown = next(((i, v) for i, v in enumerate(raw[s.label_field]) if str(v) not in label2id), None)
    if unknown is not None:
        raise SpecError(f"{key}: row {unknown[0]}: label {unknown[1]!r} is not one the model was trained with; "
                        f"its labels: {names}")
    evalset = data.tokenize_data(s, spec.cache_dir, {"eval": raw}, tokenizer, data.tokenizer_digest(spec))["eval"]
    labels = torch.tensor([label2id[str(v)] for v in evalset[s.label_field]])
    forward = logits_of or (lambda batch: model(**batch).logits)

    def logits(indices: list[int]) -> torch.Tensor:
        return forward(dist.to_device(data.collate(evalset, indices, tokenizer.pad_token_id)))

    return evaluation.classification(len(evalset), batch_size, d, logits, labels, len(names))


def _masked(spec: Spec, d: Dist, s: SharedEvalSpec, raw, model, tokenizer, batch_size: int,
            mask_prob: float) -> dict[str, float]:
    evalset = data.tokenize_data(s, spec.cache_dir, {"eval": raw}, tokenizer, data.tokenizer_digest(spec))["eval"]
    masker = Masker(tokenizer, mask_prob, spec.seed)
    loss = MaskedLMLoss(model)

    def loss_of(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [max(i, 0) for i in indices]
        batch = data.collate(evalset, rows, tokenizer.pad_token_id)
        masker(batch, [(i, EVAL_EPOCH) for i in rows])
        batch["labels"][torch.tensor(indices) < 0] = -100  # padding rows: forward pass only
        return loss(**dist.to_device(batch))

    return evaluation.language_model(len(evalset), batch_size, d, loss_of)


def _causal(spec: Spec, d: Dist, key: str, s: SharedEvalSpec, raw, model, tokenizer,
            batch_size: int) -> dict[str, float]:
    eos = end_of_document(tokenizer)
    docs = _documents(spec, key, s, raw, tokenizer, eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # masked out either way

    def loss_of(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = dist.to_device(data.collate(docs, [max(i, 0) for i in indices], pad))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        # Position j predicts token j + 1: counted where that token is real, in a real row.
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        real = torch.tensor([i >= 0 for i in indices], device=ids.device).unsqueeze(1)
        weights = (mask[:, 1:].bool() & real).flatten().float()
        return losses @ weights, weights.sum()

    return evaluation.language_model(len(docs), batch_size, d, loss_of)


def _documents(spec: Spec, key: str, s: SharedEvalSpec, raw, tokenizer, eos: int):
    """The set's lines as clm reads documents (no special tokens, then `eos`; blank lines are none), each cut to
    max_length tokens; cached under cache_dir, each rank tokenizing a share."""
    field, digest = s.text_field, data.tokenizer_digest(spec)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [text for text in batch[field] if isinstance(text, str) and text.strip()]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [(doc + [eos])[: s.max_length] for doc in ids]}

    out_dir = Path(spec.cache_dir, "tokenized")
    cached = data.cache_key("shared-clm-documents", digest, raw._fingerprint, field, eos, s.max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = data.map_by_rank(raw, encode, key=cached, path=out_dir / f"shared-clm-{cached}",
                            remove_columns=raw.column_names)
    if len(docs) == 0:
        raise SpecError(f"{key}: no line with text in {s.eval_files or 'the eval split'}")
    return docs
