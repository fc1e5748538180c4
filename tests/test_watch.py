"""What `baton run` shows while a stage runs (launcher/watch.py), and `baton status --json` on a run in progress:
both read a stage's metrics.jsonl and rank 0's stdout log as the stage writes them. No training here: the files are
written the way a stage writes them (docs/stage-contract.md)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from launcher import ledger
from launcher.progress import Progress
from launcher.watch import Watch
from tests.conftest import ROOT

LAUNCHED = "2026-11-30T10:00:00.000+00:00"
T0 = 1796032800.0  # LAUNCHED as unix time


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(text)


def _record(folder: Path, **rec: object) -> None:
    _append(folder / "metrics.jsonl", json.dumps(rec) + "\n")


def _stage(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A stage folder as a running mlm stage leaves it after 200 of 1500 steps, and its rank 0 stdout log."""
    folder = tmp_path / "run" / "stages" / "pretrain"
    log_dir = folder / "logs" / "attempt-1"
    stdout = log_dir / "none_ab12" / "attempt_0" / "0" / "stdout.log"
    _record(folder, event="start", time=T0 + 5, step=0, max_steps=1500, world_size=2)
    _record(folder, event="first_step", time=T0 + 9.5, startup_s=9.1)
    for step in (100, 200):
        _record(folder, event="train", time=T0 + 10 + step / 10, step=step, samples=step * 32, loss=7.5 - step / 100,
                lr=1e-3, tokens=12_800, steps_per_s=10.0, tokens_per_s=12_345.6)
    _record(folder, event="eval", time=T0 + 31, step=200, eval_loss=6.25, perplexity=518.0)
    _append(stdout, "pretrain: mlm, 3000 train samples, 1500 steps, ZeRO-2\nfirst step after 9.1 s\n"
            "step 100/1500  loss 6.5000  lr 1.000e-03  10.00 steps/s  12,346 tokens/s  eta 140 s\n")
    return folder, log_dir, stdout


def test_progress_reads_only_what_was_added_and_waits_for_a_line_being_written(tmp_path):
    folder, _, _ = _stage(tmp_path)
    p = Progress(folder, LAUNCHED)
    assert p.update()
    assert (p.step, p.max_steps, p.loss, p.tokens, p.eval_step) == (200, 1500, 5.5, 25_600, 200)
    assert p.eta_s == 130.0 and round(p.startup_s or 0, 3) == 9.5 and p.eval == {"eval_loss": 6.25, "perplexity": 518.0}
    assert not p.update()  # nothing new
    line = json.dumps({"event": "train", "time": T0 + 40, "step": 300, "loss": 4.0, "tokens": 100, "steps_per_s": 20.0})
    _append(folder / "metrics.jsonl", line[:20])  # the stage is still writing this line
    assert not p.update() and p.step == 200
    _append(folder / "metrics.jsonl", line[20:] + "\n")
    assert p.update() and (p.step, p.loss, p.tokens, p.eta_s) == (300, 4.0, 25_700, 60.0)
    _record(folder, event="start", time=T0 + 50, step=300, max_steps=1500, world_size=2)  # a resume
    assert p.update() and (p.step, p.tokens, p.eta_s) == (300, 0, None)


def test_live_view_shows_the_pipeline_and_a_bar_and_prints_the_stages_other_lines(tmp_path):
    folder, log_dir, stdout = _stage(tmp_path)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    overview = [("tokenizer", "tokenizer", "done"), ("pretrain", "mlm", "running"), ("finetune", "classify", "to run")]
    watch = Watch("pretrain", "mlm", folder, log_dir, LAUNCHED, overview, console=console)
    assert watch.live
    watch.poll()
    printed = out.getvalue()
    # the stage's own lines go above the view; its progress lines are in the bar instead
    assert "pretrain | pretrain: mlm, 3000 train samples" in printed and "first step after 9.1 s" in printed
    assert "step 100/1500" not in printed
    console.print(watch.render())
    view = out.getvalue()[len(printed):]
    rows = [line for line in view.splitlines() if line.strip()]
    assert rows[0].split()[:4] == ["✓", "tokenizer", "tokenizer", "done"]
    assert rows[1].split()[:3] == ["▶", "pretrain", "mlm"] and "━" in rows[1]
    for part in ("step 200/1500", "loss 5.5000", "12,346 tokens/s", "eta 2:10", "eval_loss 6.25", "(step 200)"):
        assert part in view, (part, view)
    assert rows[-1].split() == ["·", "finetune", "classify", "to", "run"]
    _append(stdout, "warning: checkpoint step00000200 is damaged\n")
    watch.poll()
    assert "pretrain | warning: checkpoint step00000200 is damaged" in out.getvalue()


def test_plain_lines_carry_the_time_and_the_stage(tmp_path, capsys):
    folder, log_dir, stdout = _stage(tmp_path)
    console = Console(file=io.StringIO(), force_terminal=False)
    with Watch("pretrain", "mlm", folder, log_dir, LAUNCHED, console=console) as watch:
        assert not watch.live
        _append(stdout, "step 200/1500  loss 5.5000\n")
        time.sleep(1.2)  # a poll or two of the watching thread
        seen = capsys.readouterr().out.splitlines()
        _append(stdout, "eval eval_loss 6.2500\n")  # written just before the stage ended: read at the end
    seen += capsys.readouterr().out.splitlines()
    assert [line[9:] for line in seen] == [
        "pretrain | pretrain: mlm, 3000 train samples, 1500 steps, ZeRO-2", "pretrain | first step after 9.1 s",
        "pretrain | step 100/1500  loss 6.5000  lr 1.000e-03  10.00 steps/s  12,346 tokens/s  eta 140 s",
        "pretrain | step 200/1500  loss 5.5000", "pretrain | eval eval_loss 6.2500"]
    assert all(time.strptime(line[:8], "%H:%M:%S") for line in seen)


def test_status_json_of_a_run_in_progress_reads_the_run_folder_without_torch(tmp_path):
    folder, _, _ = _stage(tmp_path)
    run_dir = folder.parents[1]
    with ledger.Ledger(run_dir) as led:
        led.data.update(run="demo", manifest=str(tmp_path / "demo.yaml"))
        done = led.stage("tokenizer")
        ledger.set_state(done, "done", kind="tokenizer", output={"path": "x", "digest": "sha256:" + "ab" * 32},
                         metrics={"vocab_size": 600}, steps=0, inputs={"data": {"/d/pretrain.txt": "sha256:00"}})
        done["attempts"].append({"attempt": 1, "started": LAUNCHED, "ended": LAUNCHED})
        running = led.stage("pretrain")
        ledger.set_state(running, "running", kind="mlm", inputs={
            "tokenizer": {"source": "stage", "stage": "tokenizer", "path": "x", "digest": "sha256:" + "ab" * 32}})
        running["attempts"].append({"attempt": 1, "started": LAUNCHED})
        led.save()
    driver = ledger.Ledger(run_dir).__enter__()  # the run's driver holds it while it runs (without: interrupted)
    code = ("import json, sys; from launcher.cli import main; main(['status', sys.argv[1], '--json']); "
            "assert 'torch' not in sys.modules and 'rich' not in sys.modules, 'imported a heavy module'")
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert (st["version"], st["run"], st["run_dir"]) == (1, "demo", str(run_dir.resolve()))
    tok, pre = st["stages"]
    assert (tok["name"], tok["state"], tok["metrics"], tok["output"]) == ("tokenizer", "done", {"vocab_size": 600},
                                                                          "sha256:" + "ab" * 32)
    assert (pre["state"], pre["steps"], pre["tries"]) == ("running", 200, 1)
    progress = pre["progress"]
    assert (progress["step"], progress["max_steps"], progress["loss"], progress["eta_s"]) == (200, 1500, 5.5, 130.0)
    assert progress["eval"] == {"eval_loss": 6.25, "perplexity": 518.0} and progress["tokens_per_s"] == 12345.6
    assert pre["inputs"] == [{"input": "tokenizer", "source": "stage", "stage": "tokenizer", "path": "x",
                              "digest": "sha256:" + "ab" * 32}]
    for wide in ([], ["--wide"]):
        text = subprocess.run([sys.executable, "-m", "launcher.cli", "status", str(run_dir), *wide], cwd=ROOT,
                              capture_output=True, text=True, timeout=60).stdout
        row = next(line for line in text.splitlines() if line.startswith("pretrain"))
        assert row.split()[:5] == ["pretrain", "mlm", "running", "200/1500", "1"] and "loss 5.5, eta 2m10s" in row
        assert row.endswith("9.5 s") == bool(wide)  # the start-up time: --wide only
    driver.__exit__()
