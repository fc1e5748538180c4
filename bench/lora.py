"""LoRA against full fine-tuning on the same sft stage: trainable parameters, peak memory per rank, step time.

    python bench/lora.py                   # 40 steps each, GPT-2 of n_embd 512 × 4 layers, ZeRO-2, 2 ranks
    python bench/lora.py --steps 100 --zero 3 --repeats 3

Both runs are one `baton run` of the same sft stage (examples/data/wordnet/sft_train.jsonl, the model built from a
config, no eval, no checkpoints); the LoRA run adds `adapter: {r, target_modules: [all-linear]}`. They alternate
(full, lora, full, lora …). Per run:

- **trainable parameters**: the stage's `adapter` record (LoRA) or the model's size (full), from metrics.jsonl;
- **peak RSS per rank**: the largest resident set of any process the run started (`os.wait4`'s ru_maxrss over its
  waited descendants: the biggest rank, as the driver and torchrun are smaller). On a CPU the model, gradients and
  Adam's moments all live there, as they would in GPU memory;
- **steady steps/s**: from the stage's "train" records, from step ⌈20 %⌉ to the last.

Prints medians and the ratios lora/full; writes bench/results/<timestamp>-lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from throughput import BIN, DATA, ROOT, environment, machine, prepare_tokenizer, read_steps

GPT2 = {"model_type": "gpt2", "n_embd": 512, "n_layer": 4, "n_head": 8, "n_positions": 128}


def manifest(tool: str, steps: int, zero: int, r: int, tokenizer: Path) -> dict:
    stage = {"name": tool, "kind": "sft", "init": {"config": GPT2}, "tokenizer": {"pretrained": str(tokenizer)},
             "data": {"train": str(DATA / "sft_train.jsonl"), "max_length": 96},
             "sft": {"max_new_tokens": 0},
             "train": {"max_steps": steps, "micro_batch_size": 8, "lr": 1.0e-3, "warmup_steps": 2, "log_every": 1},
             "eval": {"at_end": False}}
    if tool == "lora":
        stage["adapter"] = {"r": r, "target_modules": ["all-linear"]}
    return {"version": 1, "run": {"name": f"bench-lora-{tool}"},
            "defaults": {"launcher": {"nproc_per_node": 2}, "deepspeed": {"config": f"zero{zero}"}, "seed": 1234,
                         "precision": "fp32"},
            "stages": [stage]}


def model_size(tokenizer: Path) -> int:
    """Parameters of the model both runs train (tied ones once): what full fine-tuning trains."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model(**GPT2, vocab_size=len(AutoTokenizer.from_pretrained(tokenizer)))
    model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_one(tool: str, rep: int, args: argparse.Namespace, work: Path, tokenizer: Path, env: dict[str, str]) -> dict:
    folder = work / f"{tool}-{rep}"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest(tool, args.steps, args.zero, args.r, tokenizer), sort_keys=False))
    with open(folder / "run.log", "wb") as log:
        proc = subprocess.Popen([str(BIN / "baton"), "run", str(path), "--run-dir", str(folder / "run")], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{tool} failed; see {folder / 'run.log'}")
    metrics = folder / "run" / "stages" / tool / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    times, _ = read_steps(metrics)
    first = max(2, -(-args.steps // 5))
    adapter = next((r for r in records if r["event"] == "adapter"), None)
    total = model_size(tokenizer)
    return {"tool": tool, "rep": rep,
            "trainable_params": adapter["trainable_params"] if adapter else total, "total_params": total,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
            "steady_steps_per_s": round((args.steps - first) / (times[args.steps] - times[first]), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "baton-bench-lora",
                        help="run folders (replaced run by run)")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    tokenizer = prepare_tokenizer(work, env)
    runs = [run_one(tool, rep, args, work, tokenizer, env) for rep in range(args.repeats) for tool in ("full", "lora")]
    settings = {k: v for k, v in vars(args).items() if k != "work_dir"} | {"model": GPT2, "world_size": 2}
    out: dict = {"settings": settings, "machine": machine(), "runs": runs}
    keys = ("trainable_params", "peak_rss_mb", "steady_steps_per_s")
    medians = {tool: {k: statistics.median(r[k] for r in runs if r["tool"] == tool) for k in keys}
               for tool in ("full", "lora")}
    out["medians"] = medians
    out["ratios_lora_over_full"] = {k: round(medians["lora"][k] / medians["full"][k], 4) for k in keys}
    print(f"{'':>20} {'full':>14} {'lora':>14} {'lora/full':>10}")
    for k in keys:
        print(f"{k:>20} {medians['full'][k]:>14,} {medians['lora'][k]:>14,} {out['ratios_lora_over_full'][k]:>10}")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"{time.strftime('%Y%m%d-%H%M%S')}-lora.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
