"""What both peers share with each other and with baton's stages: the settings the driver wrote, the tokenized
data (the same rows, truncation and packing as baton's mlm / classify / clm stages), the model built from its
config as baton builds it, and the per-step timings file the driver reads.

Nothing here imports baton: the peers are what a user would write without it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as baton's stages: before anything imports deepspeed

import torch  # noqa: E402

PACK_BATCH = 10_000  # documents per packing batch, as baton's stages/runtime/packing.py (its remainder is dropped)


def arguments(extra: dict[str, dict] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", required=True, choices=["mlm", "clm", "classify"])
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--settings", required=True, help="the driver's settings.json (bench/throughput.py writes it)")
    p.add_argument("--out", required=True, help="JSONL of per-step timestamps, written by rank 0")
    for flag, kw in (extra or {}).items():
        p.add_argument(flag, **kw)
    args = p.parse_args()
    with open(args.settings) as f:
        settings = json.load(f)
    args.tokenizer, args.seed = settings["tokenizer"], settings["seed"]
    args.w = settings["workloads"][args.workload]
    args.cache_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "cache")
    return args


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_model(w: dict, tokenizer, seed: int, **overrides):
    """The model of w["model"] (a config), built as baton's models.build_model does, with the same seed on
    every rank."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    auto = {"mlm": AutoModelForMaskedLM, "clm": AutoModelForCausalLM,
            "classify": AutoModelForSequenceClassification}[w["kind"]]
    torch.manual_seed(seed)
    from_tok = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    config = AutoConfig.for_model(**{k: v for k, v in from_tok.items() if v is not None} | w["model"] | overrides)
    return auto.from_config(config)


def dataset(w: dict, tokenizer, cache_dir: str):
    """The training rows: {"input_ids"} (+ "labels" for classify). mlm / classify: one row per line or record,
    truncated to max_length, not padded; clm: documents + end-of-document token, packed into full blocks.
    `cache_dir`: datasets' cache, a fresh one per run as baton's (<run>/cache), so every tool tokenizes anew."""
    import datasets

    datasets.disable_progress_bars()
    fmt = "json" if w["train_file"].endswith(".jsonl") else "text"
    raw = datasets.load_dataset(fmt, data_files={"train": w["train_file"]}, split="train", cache_dir=cache_dir)
    if w["kind"] == "clm":
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

        def pack(batch):
            texts = [t for t in batch["text"] if isinstance(t, str) and t.strip()]
            ids = [doc + [eos] for doc in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
            stream = list(itertools.chain.from_iterable(ids))
            n, size = len(stream) // w["block_size"] * w["block_size"], w["block_size"]
            return {"input_ids": [stream[i : i + size] for i in range(0, n, size)]}

        return raw.map(pack, batched=True, batch_size=PACK_BATCH, remove_columns=raw.column_names)
    names = sorted({str(x) for x in raw[w["label_field"]]}) if w["kind"] == "classify" else []
    label2id = {n: i for i, n in enumerate(names)}

    def encode(batch):
        out = {"input_ids": tokenizer(batch["text"], truncation=True, max_length=w["max_length"])["input_ids"]}
        if names:
            out["labels"] = [label2id[str(x)] for x in batch[w["label_field"]]]
        return out

    ds = raw.map(encode, batched=True, remove_columns=raw.column_names)
    ds.num_labels = len(names)
    return ds


class Timings:
    """Rank 0's wall-clock time (time.time(), comparable with the driver's launch time) at the end of each
    optimizer step, and the loss every `log_every` steps; written to `path` at the end."""

    def __init__(self, path: str, rank: int, meta: dict) -> None:
        self.path, self.rank = path, rank
        self.records: list[dict] = [{"event": "start", "time": time.time(), **meta}]

    def step(self, step: int, loss: float | None = None) -> None:
        self.records.append({"event": "step", "step": step, "time": time.time(),
                             **({} if loss is None else {"loss": loss})})

    def close(self, **end) -> None:
        """`end`: what the run ends with (e.g. peak_memory_mb), an "end" record."""
        if end:
            self.records.append({"event": "end", "time": time.time(), **end})
        if self.rank == 0:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
