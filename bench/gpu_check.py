"""The GPU path in one short run: baton's clm and mlm stages in bf16 on every visible GPU (nccl, ZeRO-2) against a
plain PyTorch DDP loop doing the same work (bf16 autocast), with tokens/s, MFU and peak memory.

    python bench/gpu_check.py              # on a machine with CUDA GPUs: sized for under 5 minutes on one GPU
    python bench/gpu_check.py --cpu        # the same plumbing on the CPU (tiny models, fp32, 2 processes)

Workloads (models built from a config, baton's tokenizer of 8,000 pieces trained on the shipped glosses first):
  clm   GPT-2 small's shape (n_embd 768, 12 layers, 12 heads; 92 M parameters with this vocabulary), blocks of
        1,024 tokens packed from examples/data/wordnet/pretrain.txt, 8 per GPU
  mlm   BERT-base's shape (hidden 768, 12 layers), the same text truncated at 128 tokens, 64 rows per GPU
Each runs `--steps` optimizer steps (default 100) once under baton and once under the plain loop.

Per run: steady steps/s over the last 80 % of the steps (each tool's own timestamps), tokens/s (baton's train
records; the plain loop's is its steps/s × baton's tokens per step, the same rows), MFU (baton's records: achieved
model FLOP/s over the GPU's dense bf16 peak, stages/runtime/speed.py; the plain loop's scaled by its steps/s), and
rank 0's peak GPU memory (torch.cuda.max_memory_allocated). It prints a table with baton ÷ plain and writes
bench/results/<timestamp>-gpu_check.json. bench/README.md says what to expect.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from throughput import DATA, ROOT, WORKLOADS, environment, machine, prepare_tokenizer, run_one, settings

GPT2_SMALL = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}
BERT_BASE = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512}
GPU_WORKLOADS = {
    "clm": {"kind": "clm", "model": GPT2_SMALL, "train_file": str(DATA / "pretrain.txt"), "block_size": 1024,
            "micro_batch_size": 8, "lr": 6e-4, "schedule": "cosine"},
    "mlm": {"kind": "mlm", "model": BERT_BASE, "train_file": str(DATA / "pretrain.txt"), "max_length": 128,
            "micro_batch_size": 64, "lr": 1e-4, "schedule": "linear"},
}
TOOLS = {"baton": "baton", "plain": "plain-masked"}  # mlm: the plain loop's loss at the masked positions, as baton's


def gpus() -> tuple[int, bool, str]:
    """(visible GPUs, bf16 supported, the first one's name)."""
    import torch

    if not torch.cuda.is_available():
        return 0, False, ""
    return torch.cuda.device_count(), torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(0)


def baton_records(run: Path, workload: str) -> list[dict]:
    path = run / "run" / "stages" / workload / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"] if path.is_file() \
        else []


def summary(result: dict, work: Path, steps: int) -> dict:
    """What the table shows of one run: steady steps/s, tokens/s, mfu and peak memory (baton: its train records
    in the steady window; the plain loop: its end record)."""
    folder = work / "runs" / f"{result['workload']}-{result['tool']}-0"
    out = {"steps_per_s": result.get("steady_steps_per_s")}
    if result["tool"] == "baton":
        first = (result.get("window") or [0, steps])[0]
        steady = [r for r in baton_records(folder, result["workload"]) if r["step"] > first]
        for key in ("tokens_per_s", "mfu"):
            values = [r[key] for r in steady if r.get(key) is not None]
            out[key] = statistics.median(values) if values else None
        out["peak_memory_mb"] = max((r["peak_memory_mb"] for r in steady if "peak_memory_mb" in r), default=None)
    else:
        path = folder / "timings.jsonl"
        end = [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "end"] \
            if path.is_file() else []
        out["peak_memory_mb"] = end[-1].get("peak_memory_mb") if end else None
    return out


def table(rows: dict[str, dict[str, dict]]) -> str:
    fmt = lambda x, p=1: "-" if x is None else f"{x:,.{p}f}"  # noqa: E731
    lines = [f"{'workload':8} {'tool':6} {'steps/s':>8} {'tokens/s':>10} {'mfu':>6} {'peak MiB':>9}  "
             f"{'steps/s baton/plain':>19} {'peak baton/plain':>16}"]
    for workload, tools in rows.items():
        baton, plain = tools.get("baton", {}), tools.get("plain", {})
        per_step = (baton.get("tokens_per_s") or 0) / baton["steps_per_s"] if baton.get("steps_per_s") else None
        if plain.get("steps_per_s") and per_step:  # the same rows: baton's tokens per step
            plain["tokens_per_s"] = plain["steps_per_s"] * per_step
            if baton.get("mfu"):
                plain["mfu"] = baton["mfu"] * plain["steps_per_s"] / baton["steps_per_s"]
        for name, r in (("baton", baton), ("plain", plain)):
            rel = ""
            if name == "plain":
                speed = baton.get("steps_per_s") / r["steps_per_s"] if baton.get("steps_per_s") and \
                    r.get("steps_per_s") else None
                memory = baton.get("peak_memory_mb") / r["peak_memory_mb"] if baton.get("peak_memory_mb") and \
                    r.get("peak_memory_mb") else None
                rel = f"  {fmt(speed, 2):>19} {fmt(memory, 2):>16}"
            mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
            lines.append(f"{workload:8} {name:6} {fmt(r.get('steps_per_s'), 2):>8} {fmt(r.get('tokens_per_s'), 0):>10}"
                         f" {mfu:>6} {fmt(r.get('peak_memory_mb'), 0):>9}{rel}")
    lines.append("steps/s baton/plain > 1: baton faster; peak baton/plain < 1: baton holds less (ZeRO-2 shards the "
                 "optimizer state over the GPUs; on one GPU it shards nothing).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    p.add_argument("--cpu", action="store_true", help="the plumbing on the CPU: tiny models, fp32, 2 processes")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "baton-gpu-check")
    args = p.parse_args()
    count, bf16, name = gpus()
    if args.cpu:
        workloads, precision, nproc = {k: WORKLOADS[k] for k in GPU_WORKLOADS}, "fp32", 2
    elif not count:
        sys.exit("no CUDA GPU is visible: nothing to check (python bench/gpu_check.py --cpu checks the plumbing)")
    elif not bf16:
        sys.exit(f"{name} does not support bf16; this check measures the bf16 path")
    else:
        workloads, precision, nproc = GPU_WORKLOADS, "bf16", count
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    if not args.cpu:
        env.pop("OMP_NUM_THREADS", None)  # torchrun's default; the GPUs do the work
    t0, stamp = time.time(), time.strftime("%Y%m%d-%H%M%S")
    conf = settings(args.steps, prepare_tokenizer(work, env), 2, workloads=workloads, precision=precision,
                    nproc=nproc)
    (work / "settings.json").write_text(json.dumps(conf, indent=1))
    print(f"{nproc} process(es), {precision}, {name or 'CPU'}; {args.steps} steps per run; work dir {work}",
          flush=True)
    runs, rows = [], {}
    for workload in workloads:
        for tool, peer in TOOLS.items():
            peer = peer if workload == "mlm" else tool
            result = run_one(workload, peer, 0, args.steps, work, conf, env)
            runs.append(result)
            rows.setdefault(workload, {})[tool] = summary(result, work, args.steps) if result["exit"] == 0 else {}
    print()
    print(table(rows))
    out = ROOT / "bench" / "results" / f"{stamp}-gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine() | {"gpu": name, "gpus": count}, "steps": args.steps,
                               "precision": precision, "settings": conf, "runs": runs, "table": rows}, indent=1))
    failed = [r for r in runs if r["exit"] != 0]
    note = f"; {len(failed)} run(s) failed, see their output.log under {work / 'runs'}" if failed else ""
    print(f"\n{time.time() - t0:.0f} s in all; wrote {out.relative_to(ROOT)}{note}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
