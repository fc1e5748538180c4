"""Tokens per second and model FLOPs utilisation: what is counted, and the estimate's arithmetic."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from stages.runtime import records, speed
from stages.runtime.speed import Flops, RateWindow, TokenCounter


class _Echo(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None, **_):
        return input_ids


def test_tokens_are_the_training_passes_unpadded_tokens():
    module = _Echo()
    counter = TokenCounter(module)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    module(input_ids=torch.zeros(2, 4), attention_mask=mask)
    module(torch.zeros(3, 5))  # packed blocks, no mask: every position, input_ids given positionally
    module.eval()
    module(input_ids=torch.zeros(2, 4), attention_mask=mask)  # eval: not counted
    assert counter.take(torch.device("cpu")).tolist() == [5 + 15, 2 + 3]
    assert counter.take(torch.device("cpu")).tolist() == [0, 0]
    other = _Echo()
    counter.attach(other)  # a renewed engine's module: the old one no longer counts
    module.train()
    module(torch.zeros(1, 4))
    other(torch.zeros(1, 6))
    assert counter.take(torch.device("cpu")).tolist() == [6, 1]


def test_flops_leave_out_embedding_tables_and_count_attention():
    bert = BertForMaskedLM(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=40))
    tables = sum(m.weight.numel() for m in bert.modules() if isinstance(m, torch.nn.Embedding))
    unique = sum(p.numel() for p in bert.parameters())  # the output projection is tied to the word embeddings
    flops = speed.flops_of(bert)
    assert flops == Flops(dense_params=unique - tables, layers=2, hidden=32)
    assert flops.per_token(10) == 6 * (unique - tables) + 12 * 2 * 32 * 10
    gpt2 = speed.flops_of(GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=16, n_layer=3, n_head=2, n_positions=32)))
    assert (gpt2.layers, gpt2.hidden) == (3, 16)
    assert speed.flops_of(torch.nn.Linear(2, 2)) is None


def test_no_peak_and_so_no_mfu_on_the_cpu():
    assert speed.peak_flops("bf16") is None


def test_train_records_carry_tokens_per_s_and_mfu(tmp_path):
    flops = Flops(dense_params=1_000_000, layers=2, hidden=64)
    records.configure(str(tmp_path))
    rates = RateWindow(100, flops=flops, peak_flops=1e9)
    rates.first_step(1)
    rates.train(10, 640, 2.5, 1e-3, tokens=9000.0, rows=300.0)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["tokens_per_s"] > 0 and record["tokens"] == 9000
    # this process's peak resident set: at least the torch it imported, at most the machine
    assert 50 < record["peak_memory_mb"] < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    expected = record["tokens_per_s"] * flops.per_token(30) / 1e9
    assert record["mfu"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    plain = RateWindow(100)
    plain.train(10, 640, 2.5, 1e-3, tokens=9000.0, rows=300.0)
    assert "mfu" not in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_a_log_on_the_first_step_after_a_start_has_no_rates(tmp_path):
    """A resume whose first step is a log step measured no time: no rate (a 0 would read as a stall)."""
    records.configure(str(tmp_path))
    rates = RateWindow(100, flops=Flops(dense_params=1000, layers=2, hidden=64), peak_flops=1e9)
    rates.first_step(41)
    rates.train(41, 640, 2.5, 1e-3, tokens=0.0, rows=0.0)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 41 and not {"steps_per_s", "tokens_per_s", "mfu"} & record.keys()
    rates.train(42, 656, 2.4, 1e-3, tokens=900.0, rows=30.0)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["steps_per_s"] > 0 and record["tokens_per_s"] > 0


# ----------------------------------------------------------------- start-up


def test_a_hidden_module_fails_to_import_within_and_imports_after():
    import importlib
    import sys

    from contract.imports import hidden

    assert "tabnanny" not in sys.modules
    with hidden("tabnanny", "json"):  # json is imported already: left alone
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("tabnanny")
        assert importlib.import_module("json").dumps(1) == "1"
    assert importlib.import_module("tabnanny").__name__ == "tabnanny"


@pytest.mark.slow
def test_deepspeed_is_imported_without_mlflow_which_imports_after():
    """What each rank and the driver's config check do (contract/imports.py): DeepSpeed's autotuner finds no mlflow,
    and a tracker that asks for mlflow gets it."""
    import subprocess
    import sys

    code = """import sys
from contract.imports import DEEPSPEED_UNUSED, hidden
with hidden(*DEEPSPEED_UNUSED):
    import deepspeed
assert "mlflow" not in sys.modules
from deepspeed.autotuning import autotuner
assert not autotuner.has_mlflow
import mlflow
assert mlflow.start_run
"""
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ | {"DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
