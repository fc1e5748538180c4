"""`baton report`: the one-file HTML page, built from run folders written here the way baton writes them (a ledger
and each stage's metrics.jsonl; no training), and looked at in a real headless browser (tests/browser.py).
tests/test_decisions.py opens the page of a real run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from contract.files import file_digest
from launcher import htmlreport
from launcher.cli import main
from launcher.ledger import Ledger
from tests import browser

STAGES = ["tokenizer", "pretrain", "pretrain@2", "finetune", "prune"]
MANIFEST = """version: 1
run: {name: fake}
# a <script>alert(1)</script> in a comment stays text
evals:
  heldout: {task: classify, eval: data/eval.jsonl}
stages: []
"""


def attempt(n: int, exit_code: int, outcome: str, resumed_from: str | None = None) -> dict[str, Any]:
    """An attempt record as launcher/attempts.py writes it."""
    return {"attempt": n, "backend": "local", "started": f"2026-11-30T10:0{n}:00.000+00:00",
            "resumed_from": resumed_from, "world_size": 2, "command": ["torchrun", "-m", "stages.x"], "host": "vm",
            "platform": "Linux", "versions": {"python": "3.11"}, "ended": f"2026-11-30T10:0{n}:30.000+00:00",
            "exit_code": exit_code, "wall_s": 30.0, "outcome": outcome}


def train(step: int, loss: float, t: float = 0) -> dict[str, Any]:
    return {"event": "train", "time": 1796067000 + t + step, "step": step, "samples": 16 * step, "loss": loss,
            "lr": 1e-3 * step / 12, "tokens": 512, "steps_per_s": 5.0, "tokens_per_s": 2560.0}


def stage(kind: str, attempts: list[dict[str, Any]], metrics: dict[str, Any], steps: int) -> dict[str, Any]:
    return {"state": "done", "attempts": attempts, "kind": kind, "fingerprint": "sha256:" + "ab" * 32,
            "settings": {"kind": kind, "train": {"lr": 1e-3, "max_steps": steps}, "seed": 7},
            "inputs": {"data": {}}, "output": {"path": "/x/final", "digest": "sha256:" + "cd" * 32},
            "metrics": metrics, "steps": steps}


def fake_run(root: Path) -> Path:
    """A run: tokenizer; pretrain whose gate failed, retried as pretrain@2, which was stopped at step 8 after its
    checkpoint of step 6 and resumed from it; finetune scored on the shared eval set; prune (no train records)."""
    run_dir = root / "run"
    manifest = root / "fake.yaml"
    manifest.write_text(MANIFEST)
    start = {"event": "start", "time": 1796067000, "step": 0, "max_steps": 12, "world_size": 2,
             "environment": {"host": "vm", "torch": "2.13.0+cpu", "cuda": None}}
    records = {
        "tokenizer": [start | {"max_steps": 0}],
        "pretrain": [start, *(train(s, 6.5) for s in (2, 4, 6, 8, 10, 12)),
                     {"event": "eval", "time": 1796067100, "step": 12, "eval_loss": 6.4, "perplexity": 600.0}],
        "pretrain@2": [start, {"event": "first_step", "time": 1796067001, "startup_s": 9.1},
                       *(train(s, 7 - s / 4) for s in (2, 4, 6)),
                       {"event": "checkpoint", "time": 1796067006, "step": 6, "tag": "step00000006"},
                       train(8, 99.0), {"event": "stop", "time": 1796067009, "step": 8, "reason": "signal"},
                       start | {"step": 6}, train(8, 5, 100) | {"steps_per_s": 0.0, "tokens_per_s": 0.0},  # unmeasured
                       *(train(s, 7 - s / 4, 100) for s in (10, 12)),
                       {"event": "eval", "time": 1796067200, "step": 12, "eval_loss": 5.9, "perplexity": 365.0}],
        "finetune": [start | {"max_steps": 8}, *(train(s, 2.1 - s / 10) for s in (4, 8)),
                     {"event": "eval", "time": 1796067300, "step": 8, "accuracy": 0.5, "macro_f1": 0.4,
                      "eval_loss": 1.9, "heldout/accuracy": 0.45, "heldout/eval_loss": 2.0}],
        "prune": [start | {"max_steps": 0}, {"event": "prune", "time": 1796067400, "before": {"ffn": 64},
                                              "after": {"ffn": 16}, "importance": "magnitude"},
                  {"event": "eval", "time": 1796067401, "step": 0, "accuracy": 0.4, "eval_loss": 2.2,
                   "heldout/accuracy": 0.38, "heldout/eval_loss": 2.3}],
    }
    for name, recs in records.items():
        folder = run_dir / "stages" / name
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    done = attempt(1, 0, "done")
    stages = {
        "tokenizer": stage("tokenizer", [done], {"vocab_size": 600}, 0),
        "pretrain": stage("mlm", [done], {"eval_loss": 6.4, "perplexity": 600.0}, 12),
        "pretrain@2": stage("mlm", [attempt(1, 75, "preempted") | {"launcher_exit_code": 1},
                                    attempt(2, 0, "done", "step00000006")],
                            {"eval_loss": 5.9, "perplexity": 365.0}, 12),
        "finetune": stage("classify", [done], {"accuracy": 0.5, "macro_f1": 0.4, "eval_loss": 1.9,
                                               "heldout/accuracy": 0.45, "heldout/eval_loss": 2.0}, 8),
        "prune": stage("prune", [done], {"accuracy": 0.4, "eval_loss": 2.2, "heldout/accuracy": 0.38,
                                         "heldout/eval_loss": 2.3}, 0)
        | {"inputs": {"data": {}, "init": {"source": "stage", "stage": "finetune", "digest": "sha256:" + "cd" * 32}}},
    }
    gate = {"kind": "gate", "checks": [{"condition": "eval_loss <= 6.2", "compare": "<=", "right": 6.2}],
            "basis": {}, "time": "2026-11-30T10:05:00.000+00:00"}
    decisions = {"pretrain": {"rule": "sha256:00", "outcome": "pass", "hand_on": "pretrain@2", "next": None, "events": [
        gate | {"attempt": "pretrain", "passed": False, "action": "retry", "next": "pretrain@2",
                "checks": [gate["checks"][0] | {"left": 6.4, "passed": False}]},
        gate | {"attempt": "pretrain@2", "passed": True, "action": "pass",
                "checks": [gate["checks"][0] | {"left": 5.9, "passed": True}]}]}}
    ledger = {"version": 1, "stages": stages, "created": "2026-11-30T10:00:00.000+00:00", "run": "fake",
              "manifest": str(manifest), "manifest_digest": file_digest(manifest), "evals": ["heldout"],
              "decisions": decisions, "updated": "2026-11-30T10:09:00.000+00:00"}
    (run_dir / "ledger.json").write_text(json.dumps(ledger, indent=2))
    (run_dir / "manifest.yaml").write_text(MANIFEST)
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return fake_run(tmp_path)


def test_a_resume_supersedes_the_records_past_its_step() -> None:
    records = [{"event": "start", "step": 0}, {"event": "train", "step": 6, "loss": 1},
               {"event": "train", "step": 8, "loss": 99}, {"event": "checkpoint", "step": 8},
               {"event": "first_step", "startup_s": 1}, {"event": "start", "step": 6},
               {"event": "train", "step": 8, "loss": 2}]
    kept = htmlreport.final_records(records)
    assert [(r["event"], r.get("step"), r.get("loss")) for r in kept] == [
        ("start", 0, None), ("train", 6, 1), ("first_step", None, None), ("start", 6, None), ("train", 8, 2)]


def test_stages_sit_one_after_another_on_steps_and_tokens(run_dir: Path) -> None:
    from launcher.ledger import read

    cs = {c.stage: c for c in htmlreport.curves(run_dir, read(run_dir))}
    assert [cs[n].at_step for n in STAGES] == [0, 0, 12, 24, 32]
    assert [cs[n].at_tokens for n in STAGES] == [0, 0, 6 * 512, 12 * 512, 14 * 512]
    assert [r["loss"] for r in cs["pretrain@2"].train] == [6.5, 6, 5.5, 5, 4.5, 4]  # attempt 1's step 8 is gone
    assert cs["pretrain@2"].marks == [(6, "attempt 2, resumed from step00000006")]
    assert cs["pretrain@2"].x(7, "tokens") == 6 * 512 + 3 * 512


def test_the_page_opens_with_the_outcome_and_what_each_stage_bought(run_dir: Path) -> None:
    page = htmlreport.build(run_dir)
    sections = re.findall(r'<section id="(\w+)">', page)
    assert sections[:3] == ["summary", "lineage", "curves"]
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert "<b>Outcome</b>: done: 5 stage(s)" in summary
    rows = re.findall(r"<tr>(.*?)</tr>", summary.split("<tbody>")[1])
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows]
    assert [c[0] for c in cells] == STAGES
    assert cells[3] == ["finetune", "classify", "done", "heldout/accuracy", "0.45", "-"]  # from no stage
    assert cells[2][3:5] == ["perplexity", "365"]
    assert cells[4][3:] == ["heldout/accuracy", "0.38", "-0.07 vs finetune (worse)"]  # prune's init is finetune
    assert "retry as pretrain@2" in summary  # the decisions sit in the summary
    assert summary.count("<table") == 1


def test_the_charts_leave_out_what_was_not_measured(run_dir: Path) -> None:
    """A rate logged before its window began is not a stall; a single eval value gets an axis around it, not
    plotly's value ± 1; a stopped attempt shows the 75 the terminal said, torchrun's code beside it."""
    from launcher.ledger import read

    cs = htmlreport.curves(run_dir, read(run_dir))
    speed = [t for t in htmlreport.training_figure(cs).data if t.yaxis == "y3"]
    assert speed and all(v > 0 for t in speed for v in t.y)
    assert [len(t.y) for t in speed if t.name == "pretrain@2"] == [5]  # steps 2, 4, 6, 10, 12; not 8
    evals = htmlreport.eval_figure(cs)
    titles = [a.text for a in evals.layout.annotations]
    one = titles.index("macro_f1") + 1  # finetune alone has it: one point, 0.4
    assert evals.layout[f"yaxis{one}"].range == pytest.approx((0.36, 0.44))
    assert evals.layout[f"yaxis{titles.index('accuracy') + 1}"].range is None  # two values: plotly's own
    # each stage on its own steps: a metric's panel holds the stages that report it, nothing empty beside them
    lengths = {c.stage: c.length for c in cs}
    assert evals.data and all(min(t.x) >= 0 and max(t.x) <= lengths[t.name] for t in evals.data)
    assert len({t.name for t in evals.data}) > 1 and not evals.layout.shapes
    attempts = htmlreport.attempts_table(read(run_dir))
    assert "<td>75 (torchrun: 1)</td><td>preempted</td>" in attempts
    old = read(run_dir)  # a ledger from before the driver recorded 75 for a stop
    old["stages"]["pretrain@2"]["attempts"][0] |= {"exit_code": 1, "launcher_exit_code": None}
    del old["stages"]["pretrain@2"]["attempts"][0]["launcher_exit_code"]
    assert "<td>75 (torchrun: 1)</td><td>preempted</td>" in htmlreport.attempts_table(old)


def test_the_page_is_one_file_that_needs_no_network(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    assert main(["report", str(run_dir), "-o", str(out)]) == 0
    page = out.read_text()
    sources = re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?([^\"'\s>]+)", page, re.I)
    assert not [s for s in sources if not s.startswith("data:")], sources
    assert page.count("<script") - page.count('<script type="text/javascript">window.PLOTLYENV') >= 1
    assert "plotly.js v" in page and page.count("Plotly.newPlot(") == 3 and len(page) > 1_000_000
    for name in STAGES:
        assert name in page
    # the tables, the decisions, the settings; the manifest's text escaped
    for cls in ("summary", "shared", "metrics", "attempts"):
        assert f'<table class="{cls}">' in page
    assert "<td>step00000006</td>" in page and "<td>preempted</td>" in page
    assert "gate on pretrain: eval_loss &lt;= 6.2: 6.4 &lt;= 6.2 is FALSE -&gt; failed; retry as pretrain@2" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert page.count("<details") == 1 + len(STAGES)
    assert '<section id="lineage"><h2>Lineage</h2><svg' in page.replace("\n", "")


def test_the_default_place_and_a_run_that_trained_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = fake_run(tmp_path)
    data = json.loads((run_dir / "ledger.json").read_text())
    data["stages"] = {"tokenizer": data["stages"]["tokenizer"]}
    data.pop("decisions")
    data["manifest"] = str(tmp_path / "gone.yaml")
    (run_dir / "ledger.json").write_text(json.dumps(data))
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    page = (run_dir / "report.html").read_text()
    assert "No stage recorded training steps." in page and "No gates or variants" in page
    assert "the copy in the run folder" in page


def test_a_folder_without_a_ledger_is_one_line_and_exit_2(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("report", "status", "lineage"):
        assert main([command, str(tmp_path)]) == 2
        assert "no ledger.json here" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.browser
def test_the_page_renders_in_a_browser(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    assert main(["report", str(run_dir), "-o", str(out)]) == 0
    found = browser.check_report(out, STAGES, plots=3)
    assert found["tables"] == [["summary", 5], ["shared", 2], ["metrics", 5], ["attempts", 6]] and found["switched"]


def test_status_fits_80_columns_and_a_running_stage_shows_its_progress(run_dir: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads((run_dir / "ledger.json").read_text())
    members = [{"source": "stage", "stage": f"ft{i}", "digest": f"sha256:{i}" + "e" * 63} for i in range(5)]
    data["stages"]["soup-greedy"] = stage("ensemble", [attempt(1, 0, "done")], {
        **{f"member{i}/accuracy": 0.5 + i / 100 for i in range(5)}, "accuracy": 0.59, "macro_f1": 0.58,
        "eval_loss": 1.35, "kept": "ft0,ft3,ft4"}, 0) | {"inputs": {"members": members}}
    data["stages"]["sft"] = {"state": "running", "kind": "clm", "attempts": [attempt(1, 0, "running")],
                             "inputs": {"init": {"source": "stage", "digest": "sha256:" + "cd" * 32}}}
    (run_dir / "ledger.json").write_text(json.dumps(data))
    for name in data["stages"]:
        (run_dir / "stages" / name / "final").mkdir(parents=True)  # done; "final/ MISSING" is another test's
    folder = run_dir / "stages" / "sft"
    records = [{"event": "start", "time": 1796067000, "step": 0, "max_steps": 400}, train(120, 2.3125)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    with Ledger(run_dir):  # sft's driver holds the run while it runs (without it, sft shows as interrupted)
        assert main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    row = next(line for line in text.splitlines() if line.startswith("sft "))
    assert "120/400" in row and "loss 2.312" in row and "eta 56 s" in row  # 280 steps at 5 steps/s
    assert re.search(r"^soup-greedy +ensemble +done +0 +1 +member0/accuracy 0.5, .*…$", text, re.M)

    assert main(["status", str(run_dir), "--wide"]) == 0
    wide = capsys.readouterr().out
    assert max(len(line) for line in wide.splitlines()) > 80 and "…" not in wide
    assert "member4/accuracy 0.54" in wide and "kept ft0,ft3,ft4" in wide and "launch -> step 1" in wide
    assert "0eeeeeeeeeee,1eeeeeeeeeee" in wide


def test_status_of_a_manifest_shows_the_run_it_runs_in(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = fake_run(tmp_path)
    manifest = tmp_path / "elsewhere.yaml"
    manifest.write_text(MANIFEST.replace("run: {name: fake}", f"run: {{name: fake, dir: {run_dir}}}"))
    assert main(["status", str(manifest)]) == 0
    title = capsys.readouterr().out.split("\nstage ")[0]  # the folder on a line of its own where it is long
    assert title.startswith("run fake") and str(run_dir) in title
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    run_dir.rename(tmp_path / "runs" / "fake")
    assert main(["status", "fake.yaml", "--json"]) == 0  # run.name: runs/<name> in the working directory
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(tmp_path / "runs" / "fake")
    (tmp_path / "list.yaml").write_text("- a\n")
    assert main(["status", "list.yaml"]) == 2
    assert "list.yaml: neither a run folder nor a manifest" in capsys.readouterr().err


def test_a_stage_that_handed_on_its_best_eval_shows_that_step_and_its_last_one(run_dir: Path,
                                                                              capsys: pytest.CaptureFixture[str]):
    from contract.layout import Output, Result
    from launcher.attempts import _record_result

    data = json.loads((run_dir / "ledger.json").read_text())
    entry = data["stages"]["finetune"]
    result = Result(stage="finetune", kind="classify", fingerprint=entry["fingerprint"], steps=8, samples=128,
                    output=Output(path="/x/final", digest="sha256:" + "cd" * 32), time=0.0,
                    metrics={"accuracy": 0.6, "eval_loss": 1.5}, best_step=4,
                    last_metrics={"accuracy": 0.5, "eval_loss": 1.9}, stopped_early="early stopping: …")
    _record_result(entry, result, run_dir / "stages" / "finetune")
    assert (entry["metrics"], entry["best_step"], entry["last_metrics"], entry["stopped_early"]) == (
        {"accuracy": 0.6, "eval_loss": 1.5}, 4, {"accuracy": 0.5, "eval_loss": 1.9}, "early stopping: …")
    (run_dir / "ledger.json").write_text(json.dumps(data))

    assert main(["status", str(run_dir), "--json"]) == 0
    shown = next(s for s in json.loads(capsys.readouterr().out)["stages"] if s["name"] == "finetune")
    assert (shown["steps"], shown["best_step"], shown["last_metrics"]["eval_loss"]) == (8, 4, 1.9)
    assert shown["stopped_early"] == "early stopping: …"
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^finetune +classify +done[^\n]* +8 \(best 4\) +1 +accuracy 0.6", out, re.M), out

    # Run again without eval.best, the stage keeps nothing of the earlier choice
    _record_result(entry, result.model_copy(update={"best_step": None, "last_metrics": None, "stopped_early": None}),
                   run_dir / "stages" / "finetune")
    assert not {"best_step", "last_metrics", "stopped_early"} & set(entry)
