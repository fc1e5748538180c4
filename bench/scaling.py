"""How training cost grows with model size and with sequence length: baton's mlm stage vs the plain DDP loop
(bench/peers/plain_loop.py --loss masked), both run as throughput.py runs them (2 CPU processes, gloo, fp32,
ZeRO-2 for baton, the same settings, interleaved).

    python bench/scaling.py [--steps 60] [--repeats 1] [--sizes small,medium,large] [--lengths 32,64,128] [--grid]

The model sizes are checkpoint_io.py's SIZES (BERT from a config: the quickstart's, hidden 256 / 4 layers,
MiniLM's shape). The data are `pretrain.txt`'s glosses joined, in order, into rows of at least ROW_WORDS words, so
every row is truncated at max_length and a batch is max_length tokens wide (the glosses alone average 20 tokens,
99 % within 60: past 64 a longer max_length would change almost nothing). Two sweeps by default: the sizes at
--base-length (64) and the lengths at --base-size (small); --grid runs every (size, length) pair. For every run:
  steady steps/s         throughput.py's window (from step ⌈20 %⌉, a multiple of 10, to the last);
  tokens/s               steady steps/s × the non-padding tokens of an average optimizer step (global batch × the
                         mean truncated row length of the data; both tools draw rows uniformly from the same data);
  launch → first step    as throughput.py.
Prints medians, baton ÷ plain, and each cost relative to the first configuration of its sweep; writes
bench/results/<timestamp>-scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from checkpoint_io import SIZES, parameter_count
from throughput import DATA, NPROC, ROOT, environment, machine, median, prepare_tokenizer, run_one, settings

TOOLS = ("baton", "plain-masked")  # throughput.tools("mlm")'s names
ROW_WORDS = 120  # words per joined row: over 128 tokens with the 8,000-piece tokenizer


def long_rows(work: Path) -> Path:
    """pretrain.txt's non-empty lines joined in order into rows of at least ROW_WORDS words (the remainder dropped)."""
    out, rows, row = work / "scaling" / "long_rows.txt", [], []
    for line in (DATA / "pretrain.txt").read_text().splitlines():
        row += line.split()
        if len(row) >= ROW_WORDS:
            rows.append(" ".join(row))
            row = []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    return out


def row_tokens(path: Path, tokenizer: Path, length: int) -> dict:
    """Mean tokens of a row truncated at `length` (special tokens included, as the stages and peers tokenize), and
    the share of rows that fill it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    ids = tok(path.read_text().splitlines(), truncation=True, max_length=length)["input_ids"]
    return {"rows": len(ids), "mean_tokens": sum(map(len, ids)) / len(ids),
            "full_rows": sum(len(x) == length for x in ids) / len(ids)}


def configurations(sizes: list[str], lengths: list[int], base_size: str, base_length: int,
                   grid: bool) -> list[tuple[str, tuple[str, int]]]:
    """(sweep, (size, length)) pairs, each sweep's first one its reference."""
    if grid:
        return [(f"L{n}", (s, n)) for n in lengths for s in sizes]
    return [("size", (s, base_length)) for s in sizes] + [("length", (base_size, n)) for n in lengths]


def run_config(size: str, length: int, rep: int, steps: int, work: Path, conf: dict, data: Path,
               env: dict[str, str]) -> list[dict]:
    """throughput.run_one for each tool on mlm with this model and max_length, in a folder of its own (the peers
    read <work>/settings.json, and their --workload must be mlm)."""
    sub = work / "scaling" / f"{size}-L{length}"
    sub.mkdir(parents=True, exist_ok=True)
    mine = {**conf, "workloads": {"mlm": conf["workloads"]["mlm"] | {"model": SIZES[size], "max_length": length,
                                                                     "train_file": str(data)}}}
    (sub / "settings.json").write_text(json.dumps(mine, indent=1))
    runs = [run_one("mlm", tool, rep, steps, sub, mine, env) | {"size": size, "max_length": length} for tool in TOOLS]
    for r in runs:
        if r["tool"] == "baton" and "window" in r:
            r["own_tokens_per_s"] = own_tokens_per_s(sub / "runs" / f"mlm-baton-{rep}" / "run" / "stages" / "mlm"
                                                     / "metrics.jsonl", *r["window"])
    return runs


def own_tokens_per_s(metrics: Path, first: int, last: int) -> float | None:
    """Baton's own count, a cross-check of the estimate: the "train" records' tokens_per_s after step `first` up to
    `last`, weighted by their steps (None where baton does not record it)."""
    records = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "train"]
    spans = [(r["step"] - prev["step"], r.get("tokens_per_s")) for prev, r in zip(records, records[1:])
             if first < r["step"] <= last]
    if not spans or any(rate is None for _, rate in spans):
        return None
    return round(sum(n * rate for n, rate in spans) / sum(n for n, _ in spans), 1)


def table(runs: list[dict], configs: list[tuple[str, tuple[str, int]]], info: dict) -> str:
    fmt = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    ratio = lambda a, b: None if a is None or not b else a / b  # noqa: E731
    lines = [f"{'sweep':6} {'size':6} {'params':>10} {'len':>4} {'tok/step':>8}  {'tool':12} {'steps/s':>7} "
             f"{'tokens/s':>8} {'first s':>7} {'wall s':>6}  {'step time ×':>11} {'first ×':>7}  "
             f"{'steps/s baton/plain':>19} {'first baton/plain':>17}"]
    base: dict[tuple[str, str], dict] = {}
    for sweep, (size, length) in configs:
        these = [r for r in runs if r["size"] == size and r["max_length"] == length]
        per_step = info["tokens_per_step"][str(length)]
        got = {t: {k: median([r for r in these if r["tool"] == t], k)
                   for k in ("steady_steps_per_s", "launch_to_first_step_s", "wall_s")} for t in TOOLS}
        for tool in TOOLS:
            rate, first, wall = got[tool].values()
            ref = base.setdefault((sweep, tool), got[tool])
            rel = "" if tool == "baton" else (f"  {fmt(ratio(got['baton']['steady_steps_per_s'], rate)):>19}"
                                              f" {fmt(ratio(got['baton']['launch_to_first_step_s'], first)):>17}")
            lines.append(f"{sweep:6} {size:6} {info['parameters'][size]:>10,} {length:>4} {per_step:8.0f}  {tool:12} "
                         f"{fmt(rate):>7} {fmt(None if rate is None else rate * per_step, 0):>8} {fmt(first, 1):>7} "
                         f"{fmt(wall, 1):>6}  {fmt(ratio(ref['steady_steps_per_s'], rate)):>11} "
                         f"{fmt(ratio(first, ref['launch_to_first_step_s'])):>7}{rel}")
    lines += ["tok/step: non-padding tokens of an average optimizer step (global batch × mean truncated row length);",
              "step time × and first ×: relative to the sweep's first row, per tool (1 / steps/s, launch → first "
              "step);",
              "steps/s baton/plain > 1: baton faster; first baton/plain > 1: baton slower to its first step."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--lengths", default="32,64,128", help="comma-separated max_length values (at most 128)")
    p.add_argument("--base-size", default="small", help="the size the length sweep trains")
    p.add_argument("--base-length", type=int, default=64, help="the max_length the size sweep trains")
    p.add_argument("--grid", action="store_true", help="every (size, length) pair instead of the two sweeps")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "baton-bench",
                   help="run folders, logs and the tokenizer (reused)")
    args = p.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    lengths = [int(n) for n in args.lengths.split(",") if n]
    if unknown := set(sizes + [args.base_size]) - set(SIZES):
        p.error(f"unknown sizes {sorted(unknown)}; known: {', '.join(SIZES)}")
    if too_long := [n for n in lengths + [args.base_length] if not 8 <= n <= 128]:
        p.error(f"lengths {too_long}: the models have 128 positions (and a row needs room for a masked token)")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp, load_at_start = time.strftime("%Y%m%d-%H%M%S"), os.getloadavg()
    tokenizer = prepare_tokenizer(work, env)
    conf = settings(args.steps, tokenizer)
    data = long_rows(work)
    configs = configurations(sizes, lengths, args.base_size, args.base_length, args.grid)
    unique = list(dict.fromkeys(c for _, c in configs))
    batch = NPROC * conf["workloads"]["mlm"]["micro_batch_size"]
    rows = {n: row_tokens(data, tokenizer, n) for n in sorted({n for _, n in unique})}
    info = {"parameters": {s: parameter_count(SIZES[s], tokenizer) for s in sorted({s for s, _ in unique})},
            "rows": {str(n): r for n, r in rows.items()},
            "tokens_per_step": {str(n): batch * r["mean_tokens"] for n, r in rows.items()}}
    print(f"work dir {work}; {len(unique)} configurations × {len(TOOLS)} tools × {args.repeats} repeat(s) of "
          f"{args.steps} steps; {os.cpu_count()} CPUs; load average {load_at_start}", flush=True)
    print(f"data {data}: {rows[min(rows)]['rows']} rows; " + "; ".join(
        f"L{n}: {r['mean_tokens']:.1f} tokens/row, {100 * r['full_rows']:.0f} % full" for n, r in rows.items()),
        flush=True)

    runs = []
    for rep in range(args.repeats):
        for size, length in unique:
            print(f"{size} ({info['parameters'][size]:,} parameters), max_length {length}:", flush=True)
            runs += run_config(size, length, rep, args.steps, work, conf, data, env)
    print()
    print(table(runs, configs, info))
    failed = [r for r in runs if r["exit"] != 0]
    out = ROOT / "bench" / "results" / f"{stamp}-scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine() | {"load_average_at_start": load_at_start},
                               "steps": args.steps, "repeats": args.repeats, "grid": args.grid,
                               "configurations": [{"sweep": s, "size": z, "max_length": n} for s, (z, n) in configs],
                               "sizes": {s: SIZES[s] for s in info["parameters"]}, **info, "data": str(data),
                               "row_words": ROW_WORDS, "settings": conf, "runs": runs}, indent=1))
    note = f"; {len(failed)} run(s) failed, see their output.log under {work / 'scaling'}" if failed else ""
    print(f"\nwrote {out.relative_to(ROOT)}{note}")


if __name__ == "__main__":
    main()
