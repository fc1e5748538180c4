"""Training throughput and start-up: baton vs the Hugging Face Trainer (+ DeepSpeed) vs a plain PyTorch DDP loop,
on the same model, data, batch shape, schedule and world size (2 CPU processes, gloo, fp32, ZeRO-2 where
DeepSpeed is used), each run a fresh process started as a user would (`baton run`, `torchrun`).

    python bench/throughput.py [--repeats 3] [--steps 300] [--workloads mlm,clm,classify] [--quick]
                               [--zero 0|1|2|3] [--tools baton,plain]

Per workload the tools run interleaved (A B C A B C …). For every run:
  steady steps/s         optimizer steps per second from step ⌈20 %⌉ (a multiple of log_every) to the last, from
                         each tool's own timestamps (baton: metrics.jsonl "train" records; peers: their JSONL);
  launch → first step    wall seconds from the driver starting the command to the end of the first optimizer
                         step (each tool writes an absolute time.time() there);
  wall                   the whole command (baton also exports final/, the peers save nothing).
A bare `torchrun -m bench.startup_floor` (imports torch, deepspeed, transformers; exits) is the start-up floor.
Prints medians and ratios; writes bench/results/<timestamp>-throughput.json with every raw run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "wordnet"
BIN = Path(sys.executable).parent
# `pip install --target bench/.deps accelerate` gives the Trainer its dependency without adding it to the environment
# baton runs in (transformers takes other paths when accelerate is importable)
DEPS = ROOT / "bench" / ".deps"
NPROC, SEED, LOG_EVERY = 2, 1234, 10
BERT = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 512, "max_position_embeddings": 64}  # examples/quickstart.yaml's
GPT2 = {"model_type": "gpt2", "n_embd": 128, "n_layer": 2, "n_head": 2, "n_positions": 128}  # examples/clm.yaml's
TRAIN = {"grad_accum": 1, "weight_decay": 0.01, "max_grad_norm": 1.0, "betas": [0.9, 0.999], "eps": 1e-8}
WORKLOADS = {
    "mlm": {"kind": "mlm", "model": BERT, "train_file": str(DATA / "pretrain.txt"), "max_length": 48,
            "micro_batch_size": 32, "lr": 1e-3, "schedule": "linear"},
    "clm": {"kind": "clm", "model": GPT2, "train_file": str(DATA / "pretrain.txt"), "block_size": 128,
            "micro_batch_size": 8, "lr": 1e-3, "schedule": "cosine"},
    "classify": {"kind": "classify", "model": BERT, "train_file": str(DATA / "supersense_train.jsonl"),
                 "label_field": "label", "max_length": 48, "micro_batch_size": 16, "lr": 5e-4, "schedule": "linear"},
}


def tools(workload: str) -> dict[str, list[str]]:
    """Tool name → the arguments after `torchrun …` (peers) ; baton's command is built per run."""
    peers = {"trainer": ["bench/peers/hf_trainer.py"]}
    if workload == "mlm":
        peers |= {"plain-full": ["bench/peers/plain_loop.py", "--loss", "full"],
                  "plain-masked": ["bench/peers/plain_loop.py", "--loss", "masked"]}
    else:
        peers["plain"] = ["bench/peers/plain_loop.py"]
    return {"baton": [], **peers}


def settings(steps: int, tokenizer: Path, zero: int = 2, *, workloads: dict | None = None, precision: str = "fp32",
             nproc: int = NPROC) -> dict:
    """What every tool trains with; the peers read it from settings.json, baton from its manifest. `zero`: the
    ds_configs/zero<N>.json that baton and the Trainer use; `workloads`: WORKLOADS unless given."""
    from launcher.dsconfig import fill, read_template, template_path

    template = read_template(template_path(f"zero{zero}", ROOT), "bench")
    out = {}
    for name, w in (workloads or WORKLOADS).items():
        w = {**w, **TRAIN, "warmup_steps": max(1, steps // 10), "log_every": LOG_EVERY, "precision": precision,
             "nproc": nproc}
        w["deepspeed"] = fill(template, w, precision, nproc, f"ds_configs/zero{zero}.json")
        out[name] = w
    return {"tokenizer": str(tokenizer), "seed": SEED, "workloads": out}


def manifest(name: str, w: dict, steps: int, tokenizer: Path) -> dict:
    """A one-stage baton manifest of workload `w` (no eval, no checkpoints: the peers do neither)."""
    data = {"train": w["train_file"]}
    data |= {"max_length": w["max_length"]} if "max_length" in w else {}
    data |= {"label_field": w["label_field"]} if "label_field" in w else {}
    stage = {"name": name, "kind": w["kind"], "init": {"config": w["model"]},
             "tokenizer": {"pretrained": str(tokenizer)}, "data": data,
             "train": {"max_steps": steps, "micro_batch_size": w["micro_batch_size"], "lr": w["lr"],
                       "schedule": w["schedule"], "warmup_steps": w["warmup_steps"], "log_every": LOG_EVERY,
                       **{k: TRAIN[k] for k in ("grad_accum", "weight_decay", "max_grad_norm", "betas", "eps")}},
             "eval": {"at_end": False}}
    if w["kind"] == "clm":
        stage["clm"] = {"block_size": w["block_size"]}
    return {"version": 1, "run": {"name": f"bench-{name}"},
            "defaults": {"launcher": {"nproc_per_node": w.get("nproc", NPROC)},
                         "deepspeed": {"config": f"zero{w['deepspeed']['zero_optimization']['stage']}"}, "seed": SEED,
                         "precision": w.get("precision", "fp32")},
            "stages": [stage]}


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def launch(argv: list[str], log: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """(launch time, end time, exit code) of `argv` run from the repository root, its output in `log`."""
    with open(log, "wb") as out:
        t0 = time.time()
        code = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    return t0, time.time(), code


def prepare_tokenizer(work: Path, env: dict[str, str]) -> Path:
    """baton's tokenizer stage, once (a second `baton run` of a done stage does nothing)."""
    path = work / "prep.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "run": {"name": "bench-prep"}, "stages": [
        {"name": "tokenizer", "kind": "tokenizer", "data": {"train": str(DATA / "pretrain.txt")},
         "sentencepiece": {"vocab_size": 8000, "model_type": "unigram"}}]}))
    _, _, code = launch([str(BIN / "baton"), "run", str(path), "--run-dir", str(work / "prep")], work / "prep.log",
                        env)
    if code:
        sys.exit(f"the tokenizer stage failed (exit {code}); see {work / 'prep.log'}")
    return work / "prep" / "stages" / "tokenizer" / "final"


def read_steps(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """({step: time at its end}, {step: logged loss}) from baton's metrics.jsonl or a peer's JSONL."""
    times, losses = {}, {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        if r["event"] in ("train", "step", "first_step"):
            step = r.get("step", 1)
            times[step] = r["time"]
            if r.get("loss") is not None:
                losses[step] = r["loss"]
    return times, losses


def measure(times: dict[int, float], losses: dict[int, float], t0: float, steps: int) -> dict:
    first = LOG_EVERY * max(1, math.ceil(0.2 * steps / LOG_EVERY))  # the window's first step
    out: dict = {"launch_to_first_step_s": round(times[1] - t0, 3) if 1 in times else None}
    if first in times and steps in times and steps > first:
        out["steady_steps_per_s"] = round((steps - first) / (times[steps] - times[first]), 3)
        out["window"] = [first, steps]
    if losses:
        out["loss_first"], out["loss_last"] = losses[min(losses)], losses[max(losses)]
    return out


def run_one(workload: str, tool: str, rep: int, steps: int, work: Path, conf: dict, env: dict[str, str]) -> dict:
    folder = work / "runs" / f"{workload}-{tool}-{rep}"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: baton would skip a stage already done there
    folder.mkdir(parents=True)
    if tool == "baton":
        path = folder / "manifest.yaml"
        path.write_text(yaml.safe_dump(manifest(workload, conf["workloads"][workload], steps,
                                                Path(conf["tokenizer"])), sort_keys=False))
        argv = [str(BIN / "baton"), "run", str(path), "--run-dir", str(folder / "run")]
        record = folder / "run" / "stages" / workload / "metrics.jsonl"
    else:
        record = folder / "timings.jsonl"
        nproc = conf["workloads"][workload].get("nproc", NPROC)
        argv = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *tools(workload)[tool],
                "--workload", workload, "--steps", str(steps), "--settings", str(work / "settings.json"),
                "--out", str(record)]
    if tool == "trainer" and DEPS.is_dir():
        env = env | {"PYTHONPATH": os.pathsep.join((str(DEPS), env["PYTHONPATH"]))}
    t0, t1, code = launch(argv, folder / "output.log", env)
    result = {"workload": workload, "tool": tool, "repeat": rep, "exit": code, "wall_s": round(t1 - t0, 3),
              "command": argv, **measure(*read_steps(record), t0, steps)}
    if tool == "trainer":  # that DeepSpeed trained, at which ZeRO stage
        end = [r for r in map(json.loads, record.read_text().splitlines()) if r["event"] == "end"] \
            if record.is_file() else []
        result |= {k: end[-1][k] for k in ("engine", "zero_stage")} if end else {}
    if tool == "baton":
        spec = json.loads((folder / "run" / "stages" / workload / "spec.json").read_text()) if code == 0 else {}
        result["same_deepspeed_config"] = spec.get("deepspeed") == conf["workloads"][workload]["deepspeed"]
        # from the stage processes' start (baton's own figure); the rest of launch → first step is the launcher's
        result["stage_startup_s"] = next((r["startup_s"] for r in map(json.loads, record.read_text().splitlines())
                                          if r["event"] == "first_step"), None) if record.is_file() else None
    print(f"  {workload:9} {tool:13} #{rep}  exit {code}  " + "  ".join(
        f"{k} {result[k]}" for k in ("steady_steps_per_s", "launch_to_first_step_s", "wall_s", "loss_first",
                                     "loss_last") if k in result), flush=True)
    return result


def run_floor(rep: int, work: Path, env: dict[str, str]) -> dict:
    argv = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(NPROC), "-m", "bench.startup_floor"]
    t0, t1, code = launch(argv, work / f"floor-{rep}.log", env)
    print(f"  floor     bare torchrun  #{rep}  exit {code}  wall_s {t1 - t0:.3f}", flush=True)
    return {"workload": "-", "tool": "floor", "repeat": rep, "exit": code, "wall_s": round(t1 - t0, 3),
            "command": argv}


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None and r["exit"] == 0]
    return statistics.median(values) if values else None


def table(runs: list[dict], workloads: list[str]) -> str:
    fmt = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    ratio = lambda a, b: None if a is None or not b else a / b  # noqa: E731
    lines = [f"{'workload':9} {'tool':13} {'steps/s':>8} {'first step s':>12} {'wall s':>7} {'loss first→last':>16}"
             f"  {'steps/s baton/x':>15} {'first step baton/x':>18}"]
    floor = median([r for r in runs if r["tool"] == "floor"], "wall_s")
    for w in workloads:
        mine = [r for r in runs if r["workload"] == w]
        names = list(dict.fromkeys(r["tool"] for r in mine))
        base = {k: median([r for r in mine if r["tool"] == "baton"], k)
                for k in ("steady_steps_per_s", "launch_to_first_step_s")}
        for tool in names:
            these = [r for r in mine if r["tool"] == tool]
            rate, first, wall = (median(these, k) for k in ("steady_steps_per_s", "launch_to_first_step_s", "wall_s"))
            loss = f"{fmt(median(these, 'loss_first'))}→{fmt(median(these, 'loss_last'))}"
            rel = "" if tool == "baton" else (f"  {fmt(ratio(base['steady_steps_per_s'], rate)):>15}"
                                              f" {fmt(ratio(base['launch_to_first_step_s'], first)):>18}")
            lines.append(f"{w:9} {tool:13} {fmt(rate):>8} {fmt(first, 1):>12} {fmt(wall, 1):>7} {loss:>16}{rel}")
    lines.append(f"start-up floor (bare torchrun, import torch+deepspeed+transformers): {fmt(floor, 1)} s")
    for w in workloads:
        stage = median([r for r in runs if r["workload"] == w and r["tool"] == "baton"], "stage_startup_s")
        lines.append(f"baton {w}: {fmt(stage, 1)} s of its first step counted from the stage processes' start "
                     "(the rest is the launcher)")
    lines.append("steps/s baton/x > 1: baton faster; first step baton/x > 1: baton slower to its first step.")
    if "mlm" in workloads:
        lines += ["mlm: trainer and plain-full project every position onto the vocabulary, baton and plain-masked the "
                  "masked ones only;",
                  "     baton masks from a per-sample hash, the peers with DataCollatorForLanguageModeling."]
    lines.append("wall: baton also exports final/ at the end; the peers save nothing.")
    return "\n".join(lines)


def machine() -> dict:
    versions = {p: _version(p) for p in ("torch", "deepspeed", "transformers", "datasets", "accelerate")}
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "omp_num_threads": environment()["OMP_NUM_THREADS"], "load_average": os.getloadavg(), **versions}


def _version(name: str) -> str | None:
    """The installed version of `name`, in this environment or in DEPS."""
    found = next(iter(metadata.distributions(name=name, path=[*sys.path, str(DEPS)])), None)
    return found.version if found else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="mlm,clm,classify", help="comma-separated, of mlm, clm, classify")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 repeat of 30 steps")
    p.add_argument("--zero", type=int, choices=range(4), default=2,
                   help="ZeRO stage of baton and the Trainer (ds_configs/zero<N>.json); the plain loop is DDP")
    p.add_argument("--tools", help="comma-separated subset of the tools (default: all), e.g. baton,plain")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "baton-bench",
                   help="run folders, logs and the tokenizer (reused)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 30
    workloads = [w for w in args.workloads.split(",") if w]
    if unknown := set(workloads) - set(WORKLOADS):
        p.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    if _version("accelerate") is None:
        p.error("the Trainer peer needs accelerate: pip install --target bench/.deps --no-deps 'accelerate>=1.1'")
    wanted = set(args.tools.split(",")) if args.tools else None
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    conf = settings(args.steps, prepare_tokenizer(work, env), args.zero)
    (work / "settings.json").write_text(json.dumps(conf, indent=1))
    stamp, load_at_start = time.strftime("%Y%m%d-%H%M%S"), os.getloadavg()
    print(f"work dir {work}; {args.repeats} repeat(s) of {args.steps} steps; {os.cpu_count()} CPUs", flush=True)

    runs = [run_floor(rep, work, env) for rep in range(args.repeats)]
    for w in workloads:
        for rep in range(args.repeats):
            runs += [run_one(w, tool, rep, args.steps, work, conf, env) for tool in tools(w)
                     if wanted is None or {tool, tool.split("-")[0]} & wanted]  # "plain": plain-full, plain-masked
    print()
    print(table(runs, workloads))
    failed = [r for r in runs if r["exit"] != 0]
    out = ROOT / "bench" / "results" / f"{stamp}-throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine() | {"load_average_at_start": load_at_start},
                               "steps": args.steps, "repeats": args.repeats, "quick": args.quick, "zero": args.zero,
                               "settings": conf, "runs": runs}, indent=1))
    note = f"; {len(failed)} run(s) failed, see their output.log under {work / 'runs'}" if failed else ""
    print(f"\nwrote {out.relative_to(ROOT)}{note}")


if __name__ == "__main__":
    main()
