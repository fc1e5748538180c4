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
from stages.runtime import curriculum, entry, heads, lifecycle, models
from stages.runtime.dist import Dist
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

    def forward(self, labels: torch.Tensor, **batch: torch.Tensor):
        """(the real rows' logits, total loss, {"layer<i>": its loss} when there are other heads); padding rows
        (label -100) count for nothing."""
        out = self.model(**batch, output_hidden_states=bool(self.heads) and self.training)
        if not self.training:  # eval: the rows alone
            return out.logits[labels != -100], None, {}
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
    micro = spec.train.micro_batch_size
    options = spec.options_as(ClassifyLayerwise)
    tokenizer = models.load_tokenizer(spec)
    head = heads.of(spec, "classify", tokenizer)
    train = head.splits["train"]

    t = lifecycle.start(
        spec, d, num_samples=len(train), what=f"classify, {head.describe()}",
        difficulty=curriculum.difficulty(spec, train),
        build=lambda resume: models.build_model(spec, head.auto(), tokenizer, resume=resume,
                                                **head.model_args(spec.ref("init").source == "config")),
        wrap=lambda model: DeepSupervision(model, supervised(options, model)), unfreeze=options.unfreeze,
    )

    def micro_step(keys: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, loss, terms = t.engine(**head.batch("train", keys, t.sampler.max_length))
        return loss, terms

    def logits(**batch: torch.Tensor) -> torch.Tensor:
        return t.engine(**batch)[0]

    def evaluate(step: int, predictions: str | None = None) -> dict[str, float]:
        t.engine.eval()
        return head.evaluate(logits, "eval", micro, d, predictions)

    if t.fit(micro_step, evaluate, tokenizer, head=head):
        return EXIT_STOPPED
    return t.finish(lambda step: evaluate(step, f"{spec.stage_dir}/eval_predictions.jsonl"),
                    losses=lambda indices: head.example_losses(logits, indices))


def supervised(options: ClassifyLayerwise, model) -> list[float]:
    """α per layer of deep supervision for this model (exit 2 when the manifest's list does not fit it)."""
    try:
        return layer_weights(options.deep_supervision, model.config.num_hidden_layers)
    except ValueError as e:
        raise SpecError(f"layerwise.deep_supervision: {e}") from None


if __name__ == "__main__":
    entry.run_training(main)
