"""`classify`: sequence classification, one label per example. The labels are a model's own where it has them
(`Source.labels`: its config's id2label, e.g. a trained classifier scored on a shared set), else data.labels (names
in id order), else the sorted unique labels of the train split; string and integer labels both work. Eval:
accuracy, macro-F1 (from a confusion matrix summed over the ranks) and eval_loss."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contract.heads import HEADS
from stages.runtime import data, dist, heads
from stages.runtime.dist import Dist
from stages.runtime.heads import Keys, Source, common
from stages.runtime.labels import label_ids, label_names, macro_f1
from stages.runtime.spec import SpecError


class Rows(nn.Module):
    """The classifier's logits, (examples, labels); with `labels`, those of the real rows only."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        logits = self.model(**inputs).logits
        return logits if labels is None else logits[labels != -100]


class Head:
    name = "classify"
    metrics = HEADS["classify"].metrics

    def __init__(self, source: Source, splits: dict[str, Any], names: list[str | int]) -> None:
        self.source, self.splits, self.names = source, splits, names
        self.classes: list[str | int] | None = names
        label2id = {str(name): i for i, name in enumerate(names)}
        whose = "the model's labels" if source.labels is not None else \
            f"{source.key}.labels" if source.data.labels is not None else "the training data's labels"
        self.labels = {split: torch.tensor(label_ids(ds, source.data, label2id, split, source.key, whose))
                       if source.labelled else torch.full((len(ds),), heads.UNLABELLED)
                       for split, ds in splits.items() if ds is not None}
        self.ends = source.tokenizer.all_special_ids  # a curriculum phase's max_length keeps the final [SEP]

    def auto(self) -> Any:
        return heads.auto(self.name)

    def model_args(self, from_config: bool) -> dict[str, Any]:
        return {"num_labels": len(self.names), "id2label": {i: str(n) for i, n in enumerate(self.names)},
                "label2id": {str(n): i for i, n in enumerate(self.names)}}

    def describe(self) -> str:
        return f"{len(self.names)} labels, " + ", ".join(f"{split} {len(ds)} samples"
                                                         for split, ds in self.splits.items() if ds is not None)

    def batch(self, split: str, keys: Keys, max_length: int | None = None) -> dict[str, torch.Tensor]:
        rows, real = common.real(keys)
        batch = data.collate(self.splits[split], rows, self.source.tokenizer.pad_token_id, max_length, self.ends)
        batch["labels"] = self.labels[split][rows].masked_fill(~real, -100)
        return dist.to_device(batch)

    def module(self, model: nn.Module) -> nn.Module:
        return Rows(model)

    def select(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return common.select_labelled(logits, batch)

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return common.labelled_targets(batch)

    def examples(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return common.labelled_examples(batch)

    def loss(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(rows.float(), self.targets(batch))

    def sums(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[sum of the rows' losses, the confusion matrix (label × prediction) flattened], float64."""
        k, labels = len(self.names), self.targets(batch).cpu()
        rows = rows.float().cpu()
        confusion = torch.bincount(labels * k + rows.argmax(-1), minlength=k * k).double()
        return torch.cat([F.cross_entropy(rows, labels, reduction="sum").double().reshape(1), confusion])

    def metrics_of(self, total: torch.Tensor) -> dict[str, float]:
        """Collective. accuracy, macro_f1 and eval_loss (mean cross-entropy) from every rank's `sums`."""
        dist.all_reduce_sum(total)
        k = len(self.names)
        confusion = total[1:].view(k, k)
        n = float(confusion.sum())
        return {"accuracy": float(confusion.trace()) / n, "macro_f1": macro_f1(confusion),
                "eval_loss": float(total[0]) / n}

    def evaluate(self, net: Any, split: str, batch_size: int, d: Dist, predictions: str | None = None
                 ) -> dict[str, float]:
        """Collective. With `predictions`, rank 0 writes that file: per example {"index", "label", "pred", "logits"},
        in eval order."""
        if not predictions:
            return common.evaluate(self, net, split, batch_size, d)
        if self.splits.get(split) is None:
            return {}
        total = torch.zeros(1 + len(self.names) ** 2, dtype=torch.float64)
        rows: list[dict[str, Any]] = []
        with torch.no_grad():
            for indices in data.eval_shards(len(self.splits[split]), batch_size, d.world_size, d.rank):
                batch = self.batch(split, [(i, 0) for i in indices])
                logits = net(**batch)
                total += self.sums(logits, batch)
                mine = [i for i in indices if i != common.PAD]
                rows += [{"index": i, "label": int(y), "pred": int(x.argmax()), "logits": x.float().tolist()}
                         for i, y, x in zip(mine, self.targets(batch).tolist(), logits.cpu(), strict=True)]
        gathered = dist.all_gather_objects(rows)
        if dist.is_main():
            ordered = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            with open(predictions, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in ordered)
        return self.metrics_of(total)

    def example_losses(self, net: Any, indices: list[int]) -> torch.Tensor:
        return common.example_losses(self, net, indices)


def load(source: Source) -> Head:
    if source.eval_only:
        raw = {"eval": data.load_eval(source.data, source.cache_dir, source.key)}
    else:
        raw = data.load_section(source.data, source.cache_dir, train=source.train, key=source.key)
    if source.labels is None:
        assert source.labelled, "rows without labels take their class names from the labelled rows' head"
        names: list[str | int] = label_names(source.data, raw, source.key)
    else:  # the model's own, which its logits are in the order of
        if source.labelled and source.data.labels is not None and [str(x) for x in source.data.labels] \
                != source.labels:
            raise SpecError(f"{source.key}.labels: {source.data.labels} are not the model's labels {source.labels} "
                            "(in id order)")
        names = list(source.labels)
    splits = data.tokenize_data(source.data, source.cache_dir, raw, source.tokenizer, source.tokenizer_digest,
                                source.difficulty)
    return Head(source, splits, names)
