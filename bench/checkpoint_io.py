"""Baton's checkpoint save and resume load against `dd` writing and reading the same number of bytes.

    python bench/checkpoint_io.py [--repeats 3] [--sizes small,medium,large] [--work-dir DIR]

For each model size (BERT built from a config, see SIZES), on 2 processes (torchrun, gloo, ZeRO-2, fp32, as
throughput.py's mlm workload):
  save    a real `baton run` of an mlm stage with checkpoint.every_steps 1 and log_every 1 saves --repeats
          checkpoints; each save's duration is its "checkpoint" record's time minus the "train" record of the same
          step in metrics.jsonl (rank 0: between them the loop does nothing but checkpoint.save: DeepSpeed's
          files, the per-rank RNG, fsync of every file, the size and CRC-32 of every file, COMPLETE, LATEST and
          the pruning of the checkpoint keep_last (2) lets go);
  load    what lifecycle.start does on resume with that stage's spec.json and its newest checkpoint: a torchrun of
          this file (--load-worker) builds the engine as a resume does (models.build_model(resume=True),
          heads.mlm.Rows, engine.initialize), then times checkpoint.find_latest (which reads every file once to check
          its CRC-32, the ranks sharing the files) + checkpoint.load (DeepSpeed's load_checkpoint and the RNG),
          --repeats times in one process;
  dd      `dd if=/dev/zero of=FILE bs=1M count=<bytes> iflag=count_bytes conv=fsync` (one file of the
          checkpoint's total size, fsynced) and `dd if=FILE of=/dev/null bs=1M`, each timed from outside.
Both reads find their bytes in the page cache (each reads files written seconds before), as a resume on the same
machine after a stop usually does. Prints medians and ratios baton ÷ dd; writes
bench/results/<timestamp>-checkpoint_io.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from throughput import BIN, NPROC, ROOT, environment, launch, machine, manifest, prepare_tokenizer, settings

# BERT from a config, as the quickstart's (small) and larger; 128 positions so scaling.py can train 128 tokens.
# large is MiniLM-L6-H384's shape (hidden 384, 6 layers, 12 heads, intermediate 1536).
SIZES = {
    "small": {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 512, "max_position_embeddings": 128},
    "medium": {"model_type": "bert", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
               "intermediate_size": 1024, "max_position_embeddings": 128},
    "large": {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
              "intermediate_size": 1536, "max_position_embeddings": 128},
}


def parameter_count(config: dict, tokenizer: Path) -> int:
    """Parameters of BertForMaskedLM built from `config` with the tokenizer's vocabulary (tied ones once)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(**{"vocab_size": len(tok)} | config))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def timed(argv: list[str]) -> float:
    """Wall seconds of `argv` (a few ms of them are the process start)."""
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def dd(folder: Path, size: int, repeats: int) -> list[dict]:
    """Write `size` bytes to one file with fsync, read them back; `repeats` times."""
    path, out = folder / "dd.bin", []
    for _ in range(repeats):
        path.unlink(missing_ok=True)
        write = timed(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size}", "iflag=count_bytes",
                       "conv=fsync"])
        if path.stat().st_size != size:
            sys.exit(f"dd wrote {path.stat().st_size} bytes, not {size}")
        read = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
        out.append({"write_s": round(write, 4), "read_s": round(read, 4)})
    path.unlink(missing_ok=True)
    return out


def save_times(metrics: Path) -> list[dict]:
    """Each checkpoint's save duration: its "checkpoint" record's time minus the "train" record of its step."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    trained = {r["step"]: r["time"] for r in records if r["event"] == "train"}
    return [{"step": r["step"], "tag": r["tag"], "save_s": round(r["time"] - trained[r["step"]], 4)}
            for r in records if r["event"] == "checkpoint" and r["step"] in trained]


def one(name: str, repeats: int, work: Path, conf: dict, env: dict[str, str]) -> dict:
    folder = work / "checkpoint_io" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    steps = repeats + 1  # a checkpoint after each step but the last (the last exports final/ instead)
    w = conf["workloads"]["mlm"] | {"model": SIZES[name]}
    m = manifest("mlm", w, steps, Path(conf["tokenizer"]))
    m["stages"][0]["train"]["log_every"] = 1  # a "train" record just before each save
    m["stages"][0]["checkpoint"] = {"every_steps": 1}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(m, sort_keys=False))
    argv = [str(BIN / "baton"), "run", str(path), "--run-dir", str(folder / "run")]
    _, _, code = launch(argv, folder / "run.log", env)
    stage = folder / "run" / "stages" / "mlm"
    if code:
        sys.exit(f"{name}: baton run failed (exit {code}); see {folder / 'run.log'}")
    saves = save_times(stage / "metrics.jsonl")
    tag = (stage / "ckpt" / "LATEST").read_text().strip()
    files = [p for p in (stage / "ckpt" / tag).rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)

    worker = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(NPROC), "bench/checkpoint_io.py",
              "--load-worker", str(stage / "spec.json"), "--repeats", str(repeats), "--out", str(folder / "load.json")]
    _, _, code = launch(worker, folder / "load.log", env)
    if code:
        sys.exit(f"{name}: the load worker failed (exit {code}); see {folder / 'load.log'}")
    loaded = json.loads((folder / "load.json").read_text())
    copies = dd(folder, size, repeats)
    result = {"size": name, "model": SIZES[name], "parameters": loaded["parameters"], "tag": tag, "bytes": size,
              "files": len(files), "saves": saves, "loads": loaded["loads"], "dd": copies,
              "commands": {"run": argv, "load": worker}}
    loads = [round(r["find_latest_s"] + r["load_s"], 4) for r in loaded["loads"]]
    print(f"  {name:7} {loaded['parameters']:>11,} params  {size / 2**20:7.1f} MiB in {len(files)} files  "
          f"save {[s['save_s'] for s in saves]}  load {loads}"
          f"  dd write {[c['write_s'] for c in copies]}  read {[c['read_s'] for c in copies]}", flush=True)
    return result


def table(results: list[dict]) -> str:
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    lines = [f"{'size':7} {'params':>11} {'MiB':>7} {'files':>5}  {'save s':>7} {'dd write s':>10} {'save/dd':>8}"
             f"  {'load s':>7} {'(find s)':>8} {'dd read s':>9} {'load/dd':>8}"]
    for r in results:
        save = med([s["save_s"] for s in r["saves"]])
        write = med([c["write_s"] for c in r["dd"]])
        load = med([x["find_latest_s"] + x["load_s"] for x in r["loads"]])
        find = med([x["find_latest_s"] for x in r["loads"]])
        read = med([c["read_s"] for c in r["dd"]])
        lines.append(f"{r['size']:7} {r['parameters']:>11,} {r['bytes'] / 2**20:7.1f} {r['files']:>5}  {save:7.3f} "
                     f"{write:10.3f} {save / write:8.1f}  {load:7.3f} {find:8.3f} {read:9.3f} {load / read:8.1f}")
    lines += ["save: checkpoint.save in a real baton run (DeepSpeed files, RNG, fsync, CRC-32s, COMPLETE, LATEST, "
              "prune);",
              "load: checkpoint.find_latest (CRC-32 check of every file) + checkpoint.load, as a resume; "
              "(find s) is find_latest's part;",
              "dd: one file of the same bytes, conv=fsync / read to /dev/null; all reads from the page cache. "
              "Medians; ratio > 1: baton slower."]
    return "\n".join(lines)


def load_worker(spec_path: str, repeats: int, out: str) -> None:
    """Under torchrun: build the engine as a resume does, then time find_latest + load `repeats` times."""
    from stages.runtime import entry

    entry.keep_freed_memory()  # as every stage process
    from stages.runtime import checkpoint, dist, engine, models
    from stages.runtime import spec as spec_mod
    from stages.runtime.heads.mlm import Rows

    spec = spec_mod.TrainingSpec.of(spec_mod.load(spec_path))
    dist.init()
    from transformers import AutoModelForMaskedLM

    tokenizer = models.load_tokenizer(spec)
    model = models.build_model(spec, AutoModelForMaskedLM, tokenizer, resume=True)
    net = engine.initialize(Rows(model), spec, engine.max_steps(spec.train, 0))
    loads = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        saved = checkpoint.find_latest(spec)
        t1 = time.perf_counter()
        assert saved is not None, "the run left a checkpoint"
        pos = checkpoint.load(net, spec, saved, universal=False)
        dist.barrier()
        t2 = time.perf_counter()
        loads.append({"tag": saved.tag, "step": pos.step, "find_latest_s": round(t1 - t0, 4),
                      "load_s": round(t2 - t1, 4)})
    if dist.is_main():
        Path(out).write_text(json.dumps({"parameters": models.parameter_count(model), "loads": loads}))
    dist.finish(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--repeats", type=int, default=3, help="saves, loads and dd copies per size")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "baton-bench",
                   help="run folders, logs and the tokenizer (reused)")
    p.add_argument("--load-worker", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load_worker:
        load_worker(args.load_worker, args.repeats, args.out)
        return
    sizes = [s for s in args.sizes.split(",") if s]
    if unknown := set(sizes) - set(SIZES):
        p.error(f"unknown sizes {sorted(unknown)}; known: {', '.join(SIZES)}")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp, load_at_start = time.strftime("%Y%m%d-%H%M%S"), os.getloadavg()
    conf = settings(args.repeats + 1, prepare_tokenizer(work, env))
    print(f"work dir {work}; {args.repeats} save(s), load(s) and dd copies per size; {os.cpu_count()} CPUs; "
          f"load average {load_at_start}", flush=True)
    results = [one(name, args.repeats, work, conf, env) for name in sizes]
    print()
    print(table(results))
    out = ROOT / "bench" / "results" / f"{stamp}-checkpoint_io.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine() | {"load_average_at_start": load_at_start},
                               "repeats": args.repeats, "work_dir": str(work), "results": results}, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
