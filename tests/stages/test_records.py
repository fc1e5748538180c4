"""The stage's records sink (stages/runtime/records.py) and the training spec narrowed once (TrainingSpec.of)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stages.runtime import records
from stages.runtime.spec import SpecError, TrainingSpec
from tests.stages import specs


class Kept:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.closed: list[int] = []

    def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self, code: int) -> None:
        self.closed.append(code)


def test_rank_0_appends_each_record_and_hands_it_to_the_handlers(tmp_path, monkeypatch):
    kept = Kept()
    records.configure(str(tmp_path), kept)
    records.log("train", step=2, loss=float("nan"), lr=1e-3)
    records.start(4, step=6, max_steps=10, resharded_from=2)
    lines = [json.loads(line) for line in (tmp_path / records.METRICS).read_text().splitlines()]
    assert [list(r) for r in lines] == [["event", "time", "step", "loss", "lr"],
                                        ["event", "time", "step", "max_steps", "world_size", "resharded_from",
                                         "environment"]]
    assert lines[0]["loss"] is None  # a NaN is recorded as null: the file stays strict JSON
    assert kept.records == lines
    monkeypatch.setenv("RANK", "1")  # before dist.init, torchrun's RANK says which rank this is
    records.log("eval", step=2, accuracy=0.5)
    assert len((tmp_path / records.METRICS).read_text().splitlines()) == 2 and len(kept.records) == 2
    records.close(75)
    assert kept.closed == [75]


def test_a_training_spec_is_checked_once(tmp_path):
    specs.copy_data(tmp_path / "data", pretrain_lines=20, labelled_lines=20)
    stages = specs.Stages(tmp_path, specs.head("narrow") + f"""
  - name: mlm
    kind: mlm
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: 4, micro_batch_size: 4}}
""", tmp_path / "hf")
    with pytest.raises(SpecError, match="kind tokenizer trains, but train, checkpoint, eval or deepspeed is null"):
        TrainingSpec.of(stages.spec("tokenizer"))
    spec = stages.spec("mlm", outputs={"tokenizer": {"path": str(Path(tmp_path, "tok")), "digest": None}})
    narrowed = TrainingSpec.of(spec)
    assert narrowed.model_dump_json() == spec.model_dump_json() and narrowed.train.micro_batch_size == 4
    assert TrainingSpec.of(narrowed) is narrowed
