"""Data prepared once against data tokenized at start: clm's launch → first step as the corpus grows, and the
prepare stage's throughput against `datasets.map(num_proc=N)` on the same cores, in one run.

    python bench/prepare.py [--scales 1,10,100] [--steps 3] [--work-dir /tmp/baton-bench]

The corpus at ×k is pretrain.txt (40,000 WordNet glosses, 3.0 MB) written k times. The tokenizer is
throughput.py's (baton's tokenizer stage, 8,000 pieces); the model throughput.py's clm workload (examples/clm.yaml's
GPT-2, block 128, 2 CPU processes, ZeRO-2). For every scale, each in a fresh run folder (no cache):
  text       a one-stage manifest: clm with data: {train: <corpus>} (tokenizes and packs at start);
  prepared   prepare (tokenizer, corpus, shard_rows 100,000) then clm with data: {from: prepare}.
Timed: clm's launch → first step, from the ledger's start of its attempt (the moment baton starts torchrun) to its
`first_step` record; the prepare stage's whole attempt, and its tokenizing (the slowest rank's own figure: shards
tokenized and written); and, in this process, `datasets.map` of the same documents (packing.documents, the same
tokenizer, batches of 10,000) with num_proc = the stage's ranks, after the corpus is loaded (as the stage's figure).
Prints a table; writes bench/results/<timestamp>-prepare.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from throughput import BIN, DATA, NPROC, ROOT, environment, machine, manifest, prepare_tokenizer, settings

SHARD_ROWS = 100_000


def corpus(work: Path, scale: int) -> Path:
    path = work / "prepare" / f"corpus-x{scale}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (DATA / "pretrain.txt").read_text()
        with open(path, "w") as f:
            for _ in range(scale):
                f.write(text)
    return path


def run(m: dict, folder: Path, env: dict[str, str]) -> Path:
    """`baton run` of manifest `m` in a fresh run folder; the run folder."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "manifest.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    with open(folder / "baton.log", "wb") as out:
        code = subprocess.run([str(BIN / "baton"), "run", str(folder / "manifest.yaml"), "--run-dir",
                               str(folder / "run")], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"baton run failed (exit {code}); see {folder / 'baton.log'}")
    return folder / "run"


def attempt(run_dir: Path, stage: str) -> dict:
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"][stage]
    return entry["attempts"][-1]


def seconds(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def first_step_s(run_dir: Path, stage: str) -> float:
    """The stage's launch → first step: from the ledger's start of its last attempt to its first_step record."""
    records = [json.loads(line) for line in (run_dir / "stages" / stage / "metrics.jsonl").read_text().splitlines()]
    first = next(r["time"] for r in records if r["event"] == "first_step")
    return round(first - seconds(attempt(run_dir, stage)["started"]), 2)


def datasets_map_s(path: Path, tokenizer: Path, nproc: int) -> float:
    """Seconds of `datasets.map(num_proc=nproc)` making clm's documents of `path`, after loading it, no cache."""
    import datasets
    from transformers import AutoTokenizer

    from stages.runtime import packing

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    eos = packing.end_of_document(tok)
    with tempfile.TemporaryDirectory() as cache:
        ds = datasets.load_dataset("text", data_files={"train": str(path)}, cache_dir=cache)["train"]
        t0 = time.perf_counter()
        ds.map(lambda b: {"input_ids": packing.documents(tok, b["text"], eos)}, batched=True, batch_size=10_000,
               num_proc=nproc, remove_columns=["text"], cache_file_name=f"{cache}/docs.arrow")
        return round(time.perf_counter() - t0, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="1,10,100")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/baton-bench"))
    args = p.parse_args()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    tokenizer = prepare_tokenizer(work, env)
    w = settings(args.steps, tokenizer)["workloads"]["clm"]
    rows = []
    for scale in [int(s) for s in args.scales.split(",")]:
        path = corpus(work, scale)
        text = manifest("clm", w | {"train_file": str(path)}, args.steps, tokenizer)
        t_run = run(text, work / "prepare" / f"text-x{scale}", env)
        prepared = json.loads(json.dumps(text))
        clm = prepared["stages"][0]
        clm["data"] = {"from": "prepare"}
        prepared["stages"].insert(0, {"name": "prepare", "kind": "prepare", "tokenizer": clm["tokenizer"],
                                      "data": {"train": str(path)}, "prepare": {"shard_rows": SHARD_ROWS}})
        p_run = run(prepared, work / "prepare" / f"prepared-x{scale}", env)
        a = attempt(p_run, "prepare")
        said = (p_run / "stages" / "prepare" / "logs").rglob("*")
        tokenizing = max(float(m[1]) for f in said if f.is_file()
                         for m in re.finditer(r"tokenized \d+ rows in ([\d.]+) s", f.read_text(errors="replace")))
        row = {"scale": scale, "mb": round(path.stat().st_size / 1e6, 1), "lines": 40_000 * scale,
               "text_first_step_s": first_step_s(t_run, "clm"), "prepared_first_step_s": first_step_s(p_run, "clm"),
               "prepare_stage_s": a["wall_s"],
               "prepare_tokenize_s": tokenizing, "datasets_map_s": datasets_map_s(path, tokenizer, NPROC)}
        row["map_over_prepare"] = round(row["datasets_map_s"] / row["prepare_tokenize_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\nscale  MB     | clm launch → first step: text  prepared | prepare: whole  tokenize | "
          f"datasets.map(num_proc={NPROC})  map ÷ tokenize")
    for r in rows:
        print(f"×{r['scale']:<4} {r['mb']:<6} | {r['text_first_step_s']:>29} s {r['prepared_first_step_s']:>7} s | "
              f"{r['prepare_stage_s']:>12} s {r['prepare_tokenize_s']:>7} s | {r['datasets_map_s']:>22} s "
              f"{r['map_over_prepare']:>12}")
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-prepare.json"
    out.write_text(json.dumps({"machine": machine(), "steps": args.steps, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
