"""Sequence classification fine-tuning (AutoModelForSequenceClassification).

    python -m torch.distributed.run --nproc_per_node N -m stages.classify --spec spec.json

Labels come from data.labels (names in id order) or, when that is null, the
sorted unique labels of the train split; string and integer labels both work.
Eval reports eval_loss, accuracy and macro-F1 (from a confusion matrix summed
over ranks) and writes eval_predictions.jsonl in eval-file order.

Layer-wise options (`layerwise:`): gradual unfreezing (stages/runtime/layers.py) and deep supervision,
L = Σ_l α_l · L_l, with a training-only linear head on each other supervised layer's mean-pooled output
(`DeepSupervision`); final/ is the plain classifier.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contract.kinds.classify import ClassifyLayerwise, layer_weights
from contract.layout import EXIT_STOPPED
from stages.runtime import curriculum, data, dist, entry, evaluation, lifecycle, models
from stages.runtime.dist import Dist
from stages.runtime.labels import label_ids, label_names
from stages.runtime.spec import SpecError, TrainingSpec


class DeepSupervision(nn.Module):
    """The classifier and the loss L = Σ_l α_l · CE(y, ŷ_l): ŷ_L from the model's own head, ŷ_l of another
    layer (α_l > 0) from a linear head on its hidden states, mean-pooled over the tokens (encoders and decoders
    alike). The heads are training-only: checkpoints hold them, final/ (`model`) does not."""

    def __init__(self, model: Any, weights: list[float]) -> None:
        super().__init__()
        self.model, self.weights = model, weights
        hidden, labels = model.config.hidden_size, model.config.num_labels
        self.heads = nn.ModuleDict({str(i): nn.Linear(hidden, labels)
                                    for i, a in enumerate(weights[:-1]) if a > 0})

    def forward(self, labels: torch.Tensor | None = None, **batch: torch.Tensor):
        """(logits, total loss or None without labels, {"layer<i>": its loss} when there are other heads)."""
        out = self.model(**batch, output_hidden_states=bool(self.heads))
        if labels is None:
            return out.logits, None, {}
        last = len(self.weights) - 1
        logits = {last: out.logits}
        if self.heads:
            mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[0].dtype)
            for i, head in self.heads.items():  # hidden_states[0] is the embeddings' output, [i + 1] layer i's
                pooled = (out.hidden_states[int(i) + 1] * mask).sum(1) / mask.sum(1).clamp(min=1)
                logits[int(i)] = head(pooled)
        losses = {i: F.cross_entropy(x.float(), labels) for i, x in sorted(logits.items()) if self.weights[i] > 0}
        total = sum(self.weights[i] * loss for i, loss in losses.items())
        return out.logits, total, ({f"layer{i}": loss.detach() for i, loss in losses.items()} if self.heads else {})


def main(spec: TrainingSpec, d: Dist) -> int:
    from transformers import AutoModelForSequenceClassification

    micro = spec.train.micro_batch_size
    options = spec.options_as(ClassifyLayerwise)
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

    def batch_of(split, indices: list[int], max_length: int | None = None) -> dict[str, torch.Tensor]:
        ends = tokenizer.all_special_ids  # a curriculum phase's max_length keeps the final [SEP]
        return dist.to_device(data.collate(split, indices, tokenizer.pad_token_id, max_length, ends))

    t = lifecycle.start(
        spec, d, num_samples=len(train), what=f"classify, {len(names)} labels, {len(train)} train samples",
        difficulty=curriculum.difficulty(spec, train),
        build=lambda resume: models.build_model(
            spec, AutoModelForSequenceClassification, tokenizer, resume=resume,
            num_labels=len(names), id2label={i: str(n) for i, n in enumerate(names)}, label2id=label2id,
        ),
        wrap=lambda model: DeepSupervision(model, supervised(options, model)), unfreeze=options.unfreeze,
    )

    def micro_step(keys: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        indices = [i for i, _ in keys]
        batch = batch_of(train, indices, t.sampler.max_length)
        _, loss, terms = t.engine(labels=train_labels[indices].to(batch["input_ids"].device), **batch)
        return loss, terms

    def evaluate(step: int, predictions: str | None = None) -> dict[str, float]:
        if evalset is None or eval_labels is None:
            return {}
        t.engine.eval()
        return evaluation.classification(len(evalset), micro, d,
                                         lambda indices: t.engine(**batch_of(evalset, indices))[0], eval_labels,
                                         len(names), predictions)

    def example_losses(indices: list[int]) -> torch.Tensor:
        logits = t.engine(**batch_of(train, indices))[0].float().cpu()
        return F.cross_entropy(logits, train_labels[indices], reduction="none")

    if t.fit(micro_step, evaluate):
        return EXIT_STOPPED
    return t.finish(lambda step: evaluate(step, f"{spec.stage_dir}/eval_predictions.jsonl"), tokenizer,
                    losses=example_losses, task="classify")


def supervised(options: ClassifyLayerwise, model) -> list[float]:
    """α per layer of deep supervision for this model (exit 2 when the manifest's list does not fit it)."""
    try:
        return layer_weights(options.deep_supervision, model.config.num_hidden_layers)
    except ValueError as e:
        raise SpecError(f"layerwise.deep_supervision: {e}") from None


if __name__ == "__main__":
    entry.run_training(main)
