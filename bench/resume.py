"""Resume → first step against a fresh start → first step, for baton's stages (throughput.py's workloads).

    python bench/resume.py [--repeats 3] [--steps 100] [--workloads mlm,classify]

Each repeat launches `baton run` on a one-stage manifest that checkpoints at half its steps, stops it with SIGTERM
(as Ctrl-C or a scheduler does) once that checkpoint is complete, and launches `baton run` again, which resumes.
Both launches are timed the same way: wall seconds from the command's start to the end of its first optimizer step
(the stage's `first_step` record). The resumed start also loads the checkpoint (model, optimizer, RNG and data
position). Prints medians and the ratio resume ÷ fresh; writes bench/results/<timestamp>-resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import yaml
from throughput import BIN, ROOT, environment, manifest, prepare_tokenizer, settings


def first_step_after(metrics: Path, t0: float) -> float | None:
    """Seconds from `t0` to the first `first_step` record written after it."""
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        record = json.loads(line)
        if record["event"] == "first_step" and record["time"] > t0:
            return round(record["time"] - t0, 3)
    return None


def one(workload: str, rep: int, steps: int, work: Path, conf: dict, env: dict[str, str]) -> dict:
    folder = work / "resume" / f"{workload}-{rep}"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    m = manifest(workload, conf["workloads"][workload], steps, Path(conf["tokenizer"]))
    half = steps // 2
    m["stages"][0]["checkpoint"] = {"every_steps": half}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(m, sort_keys=False))
    argv = [str(BIN / "baton"), "run", str(path), "--run-dir", str(folder / "run")]
    stage = folder / "run" / "stages" / workload
    marker = stage / "ckpt" / f"step{half:08d}" / "COMPLETE"

    t0 = time.time()
    with open(folder / "fresh.log", "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        stopped = proc.wait(timeout=300)
    fresh = first_step_after(stage / "metrics.jsonl", t0)

    t1 = time.time()
    with open(folder / "resume.log", "wb") as out:
        code = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    resumed = first_step_after(stage / "metrics.jsonl", t1)
    ledger = json.loads((folder / "run" / "ledger.json").read_text())["stages"][workload]
    result = {"workload": workload, "repeat": rep, "stopped_exit": stopped, "exit": code,
              "fresh_first_step_s": fresh, "resume_first_step_s": resumed,
              "resumed_from": ledger["attempts"][-1].get("resumed_from")}
    print(f"  {workload:9} #{rep}  stopped {stopped}  fresh {fresh} s  resume {resumed} s  "
          f"from {result['resumed_from']}  exit {code}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="mlm,clm,classify")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/baton-bench"))
    args = p.parse_args()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    conf = settings(args.steps, prepare_tokenizer(work, env))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = [one(w, rep, args.steps, work, conf, env) for rep in range(args.repeats)
            for w in args.workloads.split(",")]
    print(f"\n{'workload':9} {'fresh s':>8} {'resume s':>9} {'resume/fresh':>13}")
    for w in args.workloads.split(","):
        ok = [r for r in runs if r["workload"] == w and r["exit"] == 0 and r["resumed_from"]
              and r["fresh_first_step_s"] and r["resume_first_step_s"]]
        if not ok:
            print(f"{w:9} -- no complete run; see the logs under {work / 'resume'}")
            continue
        fresh, resumed = (statistics.median(r[k] for r in ok) for k in ("fresh_first_step_s", "resume_first_step_s"))
        print(f"{w:9} {fresh:8.2f} {resumed:9.2f} {resumed / fresh:13.2f}")
    out = ROOT / "bench" / "results" / f"{stamp}-resume.json"
    out.write_text(json.dumps({"steps": args.steps, "repeats": args.repeats, "load_average": os.getloadavg(),
                               "runs": runs}, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
