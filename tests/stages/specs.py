"""Stage specs for tests, built the way the launcher resolves them (docs/stage-contract.md), and a runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WORDNET = REPO / "examples" / "data" / "wordnet"


def copy_data(dest: Path, *, pretrain_lines: int = 400, labelled_lines: int = 200) -> dict[str, Path]:
    """Small slices of the WordNet demo data, copied so tests never write near the repo."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("pretrain.txt", pretrain_lines), ("supersense_train.jsonl", labelled_lines),
                    ("supersense_eval.jsonl", labelled_lines // 2)):
        lines = (WORDNET / name).read_text().splitlines()[:n]
        (dest / name).write_text("\n".join(lines) + "\n")
        out[name] = dest / name
    return out


def deepspeed_config(zero: int, *, micro: int, accum: int, world: int, lr: float, clip: float = 1.0,
                     weight_decay: float = 0.01, precision: str = "fp32") -> dict[str, Any]:
    """ds_configs/zero<N>.json with its "auto" values filled, as the launcher does."""
    cfg = json.loads((REPO / "ds_configs" / f"zero{zero}.json").read_text())
    cfg.update(train_batch_size=micro * accum * world, train_micro_batch_size_per_gpu=micro,
               gradient_accumulation_steps=accum, gradient_clipping=clip)
    cfg["optimizer"]["params"] = {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay}
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": precision == "fp16"}
    return cfg


TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}


def spec(kind: str, stage_dir: Path, *, cache_dir: Path, train_files: list[Path], eval_files: list[Path] = (),
         fmt: str = "json", init: dict | None = None, tokenizer: dict | None = None, zero: int = 1,
         world: int = 2, micro: int = 8, accum: int = 1, max_steps: int | None = 12, epochs: float | None = None,
         lr: float = 1e-3, every_ckpt: int | None = 4, keep_last: int = 2, eval_every: int | None = None,
         options: dict | None = None, label_field: str | None = None, seed: int = 1234,
         fingerprint: str = "sha256:test") -> dict[str, Any]:
    return {
        "spec_version": 1, "run_name": "test", "stage": stage_dir.name, "kind": kind,
        "stage_dir": str(stage_dir), "cache_dir": str(cache_dir), "fingerprint": fingerprint, "seed": seed,
        "precision": "fp32", "world_size": world, "init": init, "tokenizer": tokenizer,
        "data": {
            "train_files": [str(p) for p in train_files], "eval_files": [str(p) for p in eval_files],
            "format": fmt, "hub": None, "text_field": "text", "text_pair_field": None,
            "label_field": label_field, "labels": None, "max_length": 32, "digests": {},
        },
        "train": {
            "max_steps": max_steps, "epochs": epochs, "micro_batch_size": micro, "grad_accum": accum,
            "global_batch_size": micro * accum * world, "lr": lr, "schedule": "linear", "warmup_steps": 2,
            "weight_decay": 0.01, "max_grad_norm": 1.0, "betas": [0.9, 0.999], "eps": 1e-8, "log_every": 2,
        },
        "checkpoint": {"every_steps": every_ckpt, "keep_last": keep_last},
        "eval": {"every_steps": eval_every, "at_end": True},
        "options": options or {},
        "deepspeed": deepspeed_config(zero, micro=micro, accum=accum, world=world, lr=lr),
    }


def env(hf_home: Path) -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(hf_home),
                         "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}


def write_spec(s: dict[str, Any]) -> Path:
    stage_dir = Path(s["stage_dir"])
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / "spec.json"
    path.write_text(json.dumps(s, indent=2))
    return path


def command(s: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(s["world_size"]),
            "-m", f"stages.{s['kind']}", "--spec", str(write_spec(s))]


def run_stage(s: dict[str, Any], hf_home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(s), cwd=REPO, env=env(hf_home), capture_output=True, text=True, timeout=timeout)


def fresh(stage_dir: Path) -> None:
    shutil.rmtree(stage_dir, ignore_errors=True)
