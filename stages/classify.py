"""Sequence classification fine-tuning (AutoModelForSequenceClassification).

    python -m torch.distributed.run --nproc_per_node N -m stages.classify --spec spec.json

Labels come from data.labels (names in id order) or, when that is null, the
sorted unique labels of the train split; string and integer labels both work.
Eval reports eval_loss, accuracy and macro-F1 (from a confusion matrix summed
over ranks) and writes eval_predictions.jsonl in eval-file order.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from contract.layout import EXIT_STOPPED
from stages.runtime import data, dist, entry, lifecycle, models
from stages.runtime.dist import Dist
from stages.runtime.spec import Spec, SpecError, training


def label_names(spec: Spec, raw: dict) -> list[str | int]:
    field = spec.data.label_field
    if not field:
        raise SpecError("data.label_field: required for kind classify")
    for split, ds in raw.items():
        if ds is not None and field not in ds.column_names:
            raise SpecError(f"data.label_field: column {field!r} not in the {split} split (columns: {ds.column_names})")
    if spec.data.labels is not None:
        return list(spec.data.labels)
    return sorted(set(raw["train"][field]))


def label_ids(ds, field: str, label2id: dict[str, int], split: str) -> list[int]:
    # Keyed by str(): a spec's "3" and a file's 3 name the same label.
    out = []
    for i, value in enumerate(ds[field]):
        if str(value) not in label2id:
            raise SpecError(f"data: {split} row {i}: label {value!r} is not one of {sorted(label2id)}")
        out.append(label2id[str(value)])
    return out


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (as scikit-learn's f1_score)."""
    tp = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return float(f1[present].mean()) if present.any() else 0.0


def main(spec: Spec, d: Dist) -> int:
    from transformers import AutoModelForSequenceClassification

    micro = training(spec).train.micro_batch_size
    # Tokenizer, labels and data.
    tokenizer = models.load_tokenizer(spec)
    raw = data.load_raw(spec)
    names = label_names(spec, raw)
    label2id = {str(name): i for i, name in enumerate(names)}
    splits = data.tokenize(spec, raw, tokenizer, data.tokenizer_digest(spec))
    train, evalset = splits["train"], splits["eval"]
    field = spec.data.label_field
    train_labels = torch.tensor(label_ids(train, field, label2id, "train"))
    eval_labels = torch.tensor(label_ids(evalset, field, label2id, "eval")) if evalset is not None else None

    def batch_of(split, indices: list[int]) -> dict[str, torch.Tensor]:
        return dist.to_device(data.collate(split, indices, tokenizer.pad_token_id))

    t = lifecycle.start(
        spec, d, num_samples=len(train), what=f"classify, {len(names)} labels, {len(train)} train samples",
        build=lambda resume: models.build_model(
            spec, AutoModelForSequenceClassification, tokenizer, resume=resume,
            num_labels=len(names), id2label={i: str(n) for i, n in enumerate(names)}, label2id=label2id,
        ),
    )

    def micro_step(keys: list[tuple[int, int]]) -> torch.Tensor:
        indices = [i for i, _ in keys]
        logits = t.engine(**batch_of(train, indices)).logits
        return F.cross_entropy(logits.float(), train_labels[indices].to(logits.device))

    def evaluate(step: int, predictions_path: str | None = None) -> dict[str, float]:
        if evalset is None or eval_labels is None:
            return {}
        t.engine.eval()
        k = len(names)
        confusion = torch.zeros(k * k, dtype=torch.float64)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        rows = []
        with torch.no_grad():
            for indices in data.eval_shards(len(evalset), micro, d.world_size, d.rank):
                # Padding rows (index -1) run through the model with zero weight: ZeRO-3 needs equal forward counts.
                real = torch.tensor(indices) >= 0
                safe = [max(i, 0) for i in indices]
                logits = t.engine(**batch_of(evalset, safe)).logits.float().cpu()  # metrics on the CPU
                labels, preds = eval_labels[safe], logits.argmax(-1)
                loss_sum += (F.cross_entropy(logits, labels, reduction="none") * real).sum().double()
                confusion += torch.bincount((labels * k + preds)[real], minlength=k * k).double()
                if predictions_path:
                    rows += [{"index": i, "label": int(labels[j]), "pred": int(preds[j]), "logits": logits[j].tolist()}
                             for j, i in enumerate(indices) if i >= 0]
        dist.all_reduce_sum(loss_sum)
        dist.all_reduce_sum(confusion)
        if predictions_path:
            gathered = dist.all_gather_objects(rows)
            if dist.is_main():
                ordered = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
                with open(predictions_path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in ordered)
        confusion = confusion.view(k, k)
        total = float(confusion.sum())
        return {"accuracy": float(confusion.trace()) / total, "macro_f1": macro_f1(confusion),
                "eval_loss": float(loss_sum) / total}

    if t.fit(micro_step, evaluate):
        return EXIT_STOPPED
    return t.finish(lambda step: evaluate(step, f"{spec.stage_dir}/eval_predictions.jsonl"), tokenizer)


if __name__ == "__main__":
    entry.run(main)
