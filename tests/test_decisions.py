"""Evaluation between stages: gates (pass, stop, retry, fallback), variants and their selection, every decision in
the ledger, replayed on resume.

The real driver (`baton run` in this process) with the stand-in back-end of test_reliability_launcher, whose
stages report metrics set by their settings: a classify stage's accuracy is 1000 × its lr (eval_loss 1 − accuracy),
a prune stage's is its prune.ffn. So each decision's numbers are known in advance. tests/stages/test_gates.py runs
the same decisions with real stages, tests/slurm/test_slurm.py under `baton submit`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from contract.layout import EXIT_GATE_STOPPED, read_result, stage_dir
from contract.spec import Spec
from launcher import lineage as lineage_graph
from launcher.ledger import read
from launcher.report import status
from tests.conftest import ROOT, baton, expected_decisions, timeless
from tests.slurm.helpers import assert_same_weights, final_weights, wait_for_checkpoint
from tests.test_ledger_plan import GLOSSES, LABELLED
from tests.test_reliability_launcher import FakeBackend, backend, play_stage, run  # noqa: F401 (a fixture)

MANIFEST = """\
version: 1
run: {{name: gates}}
defaults:
  launcher: {{nproc_per_node: 2}}
evals:
  heldout: {{task: classify, eval: data/labelled.jsonl}}
stages:
  - name: tok
    kind: tokenizer
    data: {{train: data/glosses.txt}}
    sentencepiece: {{vocab_size: 100}}
  - name: pre
    kind: mlm
    init:
      config: {{model_type: bert, hidden_size: 32, num_attention_heads: 2}}
    tokenizer: {{from: tok}}
    data: {{train: data/glosses.txt, eval: data/glosses.txt}}
    train: {{max_steps: 2, micro_batch_size: 4}}
  - name: ft
    kind: classify
    init: {{from: pre}}
    data: {{train: data/labelled.jsonl, eval: data/labelled.jsonl}}
    train: {{max_steps: 2, micro_batch_size: 4, lr: {lr}}}
{ft_extra}
  - name: small
    kind: prune
    init: {{from: ft}}
    data: {{train: data/labelled.jsonl, eval: data/labelled.jsonl}}
    prune: {{task: classify, ffn: {ffn}}}
    gate: {{require: "accuracy >= upstream.accuracy - 0.02", on_fail: fallback, fallback: ft}}
  - name: after
    kind: classify
    init: {{from: small}}
    data: {{train: data/labelled.jsonl, eval: data/labelled.jsonl}}
    train: {{max_steps: 2, micro_batch_size: 4}}
"""


def lineage(run_dir: Path) -> str:
    return lineage_graph.text(lineage_graph.graph(run_dir))


def write(folder: Path, *, lr: float = 8e-4, ft_extra: str = "", ffn: float = 0.9) -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "glosses.txt").write_text(GLOSSES)
    (folder / "data" / "labelled.jsonl").write_text(LABELLED)
    path = folder / "gates.yaml"
    path.write_text(MANIFEST.format(lr=lr, ft_extra=ft_extra, ffn=ffn))
    return path


def metrics_of(spec: Spec) -> dict[str, float]:
    """The stand-in stage's metrics: known from its settings."""
    if spec.kind == "tokenizer":
        return {"vocab_size": 100}
    accuracy = round(spec.options["ffn"] if spec.kind == "prune" else 1000 * spec.train.lr, 6)  # type: ignore[union-attr]
    shared = {f"{name}/accuracy": accuracy - 0.1 for name in spec.shared_evals}
    return {"accuracy": accuracy, "eval_loss": round(1 - accuracy, 6)} | shared


@pytest.fixture
def scored(backend: FakeBackend) -> FakeBackend:  # noqa: F811
    backend.act = lambda spec, log_dir: play_stage(spec, log_dir, metrics_of(spec))
    return backend


def entries(run_dir: Path) -> dict[str, Any]:
    return read(run_dir)["stages"]


def test_a_gate_that_passes_hands_on_the_stage(tmp_path: Path, scored: FakeBackend,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    gate = "    gate: {require: [accuracy >= 0.75, eval_loss < 0.3]}"
    manifest, run_dir = write(tmp_path, ft_extra=gate), tmp_path / "r"
    assert run("run", manifest, "--run-dir", run_dir) == 0
    out = capsys.readouterr().out
    assert ("== ft: gate on ft: accuracy >= 0.75: 0.8 >= 0.75 is true; eval_loss < 0.3: 0.2 < 0.3 is true "
            "-> passed") in out
    led = read(run_dir)
    assert led["decisions"]["ft"]["outcome"] == "pass" and led["decisions"]["ft"]["hand_on"] == "ft"
    assert led["stages"]["small"]["inputs"]["init"]["stage"] == "ft"
    # the shared eval set: only the classifiers are scored on it (the spec gives it to them alone)
    assert set(Spec.load(stage_dir(run_dir, "ft") / "spec.json").shared_evals) == {"heldout"}
    assert Spec.load(stage_dir(run_dir, "pre") / "spec.json").shared_evals == {}
    assert "shared evals  heldout/accuracy" in status(run_dir)
    # a run again replays the decisions: nothing runs, nothing is decided anew
    before = led["decisions"]
    assert run("run", manifest, "--run-dir", run_dir) == 0
    assert read(run_dir)["decisions"] == before and "gate on" not in capsys.readouterr().out


def test_a_run_ends_with_each_stage_s_key_metric_and_what_it_bought(tmp_path: Path, scored: FakeBackend,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The live view scrolls the numbers away: `baton run` ends with the outcome and a row per stage, its key
    metric (on the shared eval set where it has one) and the change against the stage it started from."""
    manifest, run_dir = write(tmp_path, ffn=0.75), tmp_path / "r"
    assert run("run", manifest, "--run-dir", run_dir, "--only", "tok") == 0
    capsys.readouterr()
    assert run("run", manifest, "--run-dir", run_dir) == 0
    lines = capsys.readouterr().out.splitlines()
    end = lines[lines.index("outcome: done: 5 stage(s)"):]
    assert [line.split() for line in end[1:]] == [
        ["stage", "state", "this", "run", "key", "metric", "change"],
        ["tok", "done", "-", "vocab_size", "100", "-"],  # kept from the first run
        ["pre", "done", "ran", "accuracy", "0.05", "-"],
        ["ft", "done", "ran", "heldout/accuracy", "0.7", "-"],  # ft's gate is default: accuracy 0.8, shared 0.7
        ["small", "done", "ran", "heldout/accuracy", "0.65", "-0.05", "vs", "ft", "(worse)"],
        ["after", "done", "ran", "heldout/accuracy", "-0.05", "-0.75", "vs", "ft", "(worse)"]]  # small fell back
    assert run("run", manifest, "--run-dir", run_dir) == 0  # a run with nothing to do shows the same
    assert capsys.readouterr().out.splitlines()[-6:] == [line.replace(" ran ", " -   ") for line in end[1:]]


def test_a_gate_that_stops_ends_the_run_with_its_numbers(tmp_path: Path, scored: FakeBackend,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    gate = "    gate: {require: accuracy >= 0.8, on_fail: stop}"
    manifest, run_dir = write(tmp_path, lr=6e-4, ft_extra=gate), tmp_path / "r"
    assert run("run", manifest, "--run-dir", run_dir) == EXIT_GATE_STOPPED
    out, err = capsys.readouterr()
    assert "stage ft failed its gate on ft: accuracy >= 0.8 is false: 0.6 against 0.8" in err
    assert "\noutcome: stopped by the gate on ft: " in out  # the run's summary says so too
    assert "small" not in entries(run_dir) and "after" not in entries(run_dir)  # downstream never started
    assert "ft: STOPPED THE RUN" in status(run_dir)
    # replayed, not re-decided: the same stop, no attempt
    assert run("run", manifest, "--run-dir", run_dir) == EXIT_GATE_STOPPED
    assert "0.6 against 0.8" in capsys.readouterr().err and len(entries(run_dir)["ft"]["attempts"]) == 1
    # a gate changed by hand is decided anew (ft itself is unchanged: its settings do not include the gate)
    write(tmp_path, lr=6e-4, ft_extra="    gate: {require: accuracy >= 0.5, on_fail: stop}")
    assert run("run", manifest, "--run-dir", run_dir) == 0
    assert "== ft: gate on ft: accuracy >= 0.5: 0.6 >= 0.5 is true -> passed" in capsys.readouterr().out
    assert len(entries(run_dir)["ft"]["attempts"]) == 1 and entries(run_dir)["after"]["state"] == "done"


def test_stages_built_under_a_decision_since_tightened_show_as_stale(tmp_path: Path, scored: FakeBackend,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """ft's gate passes and small and after are built on ft; the gate is tightened and ft now fails it, which stops
    the run: small and after were made under the looser decision, and status and lineage say so."""
    manifest, run_dir = write(tmp_path, lr=6e-4, ft_extra="    gate: {require: accuracy >= 0.5, on_fail: stop}"), \
        tmp_path / "r"
    assert run("run", manifest, "--run-dir", run_dir) == 0
    assert "stale" not in status(run_dir) and "STALE" not in lineage(run_dir)
    write(tmp_path, lr=6e-4, ft_extra="    gate: {require: accuracy >= 0.8, on_fail: stop}")
    assert run("run", manifest, "--run-dir", run_dir) == EXIT_GATE_STOPPED
    capsys.readouterr()
    rows = {line.split()[0]: line.split()[2:4] for line in status(run_dir).split("\n\n")[0].splitlines()[2:]}
    assert rows["ft"][0] == "done" and rows["ft"][1] != "(stale)"
    assert rows["small"] == ["done", "(stale)"] and rows["after"] == ["done", "(stale)"], status(run_dir)
    from launcher.report import status_data

    stale = {s["name"]: s.get("stale") for s in status_data(run_dir)["stages"]}
    assert stale["small"] == "built on ft, which the decision on ft no longer hands on (it stopped the run)"
    assert stale["after"] and stale["tok"] is None and stale["ft"] is None
    text = lineage(run_dir)
    line = next(x for x in text.split("small [prune]")[1].splitlines() if x.startswith("  <- init ft/final"))
    assert "(STALE: the decision on ft no longer hands it on)" in line, text


def test_a_retry_whose_second_attempt_passes(tmp_path: Path, scored: FakeBackend,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    gate = ("    gate: {require: accuracy >= 0.8, on_fail: retry,\n"
            "           retries: [{train.lr: 7.0e-4}, {train.lr: 9.0e-4, seed: 7}, {train.lr: 1.0e-3}]}")
    manifest, run_dir = write(tmp_path, lr=5e-4, ft_extra=gate), tmp_path / "r"
    assert run("run", manifest, "--run-dir", run_dir) == 0
    out = capsys.readouterr().out
    assert "gate on ft: accuracy >= 0.8: 0.5 >= 0.8 is FALSE -> failed; retry as ft@2" in out
    assert "gate on ft@2: accuracy >= 0.8: 0.7 >= 0.8 is FALSE -> failed; retry as ft@3" in out
    assert "gate on ft@3: accuracy >= 0.8: 0.9 >= 0.8 is true -> passed" in out
    led = read(run_dir)
    # every attempt's folder and metrics kept; the fourth never ran
    assert [led["stages"][n]["metrics"]["accuracy"] for n in ("ft", "ft@2", "ft@3")] == [0.5, 0.7, 0.9]
    assert "ft@4" not in led["stages"] and all((stage_dir(run_dir, n) / "final").is_dir() for n in ("ft", "ft@2"))
    assert Spec.load(stage_dir(run_dir, "ft@3") / "spec.json").seed == 7
    assert led["decisions"]["ft"]["hand_on"] == "ft@3"
    init = led["stages"]["small"]["inputs"]["init"]
    assert (init["stage"], init["named"], init["digest"]) == ("ft@3", "ft", led["stages"]["ft@3"]["output"]["digest"])
    assert "<- init ft@3/final" in lineage(run_dir) and "handed on for ft" in lineage(run_dir)


def test_a_kill_in_the_middle_of_a_retry_resumes_that_attempt(tmp_path: Path, scored: FakeBackend,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    gate = "    gate: {require: accuracy >= 0.8, on_fail: retry, retries: [{train.lr: 9.0e-4}]}"
    manifest, run_dir = write(tmp_path, lr=5e-4, ft_extra=gate), tmp_path / "r"

    def preempted(spec: Spec, log_dir: Path) -> int:
        """ft@2 is stopped after its first checkpoint (a signal: exit 75)."""
        if spec.stage != "ft@2":
            return play_stage(spec, log_dir, metrics_of(spec))
        tag = Path(spec.stage_dir) / "ckpt" / "step00000001"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text(json.dumps({"step": 1, "samples": 8, "fingerprint": spec.fingerprint,
                                                  "world_size": 2}))
        return 75

    scored.act = preempted
    assert run("run", manifest, "--run-dir", run_dir) == 75
    assert entries(run_dir)["ft@2"]["state"] == "preempted"
    scored.act = lambda spec, log_dir: play_stage(spec, log_dir, metrics_of(spec))
    assert run("run", manifest, "--run-dir", run_dir) == 0
    out = capsys.readouterr().out
    assert "== ft: skip (done, unchanged)" in out
    assert "== ft@2 (classify): resume (preempted; resume from step00000001)" in out
    attempts = entries(run_dir)["ft@2"]["attempts"]
    assert [a["resumed_from"] for a in attempts] == [None, "step00000001"]
    assert len(entries(run_dir)["ft"]["attempts"]) == 1  # the first attempt was not run again, nor re-decided
    assert [e["attempt"] for e in read(run_dir)["decisions"]["ft"]["events"]] == ["ft", "ft@2"]


def test_a_fallback_hands_on_the_earlier_stage(tmp_path: Path, scored: FakeBackend,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    manifest, run_dir = write(tmp_path, lr=8e-4, ffn=0.5), tmp_path / "r"
    assert run("run", manifest, "--run-dir", run_dir) == 0
    out = capsys.readouterr().out
    assert "gate on small: accuracy >= upstream.accuracy - 0.02: 0.5 >= 0.78 is FALSE -> failed; fallback" in out
    led = read(run_dir)
    assert led["decisions"]["small"] | {"events": None} == {
        "rule": led["decisions"]["small"]["rule"], "outcome": "fallback", "hand_on": "ft", "next": None,
        "fallback": "ft", "events": None}
    init = led["stages"]["after"]["inputs"]["init"]
    assert (init["stage"], init["named"]) == ("ft", "small")
    assert init["digest"] == led["stages"]["ft"]["output"]["digest"] != led["stages"]["small"]["output"]["digest"]
    assert "<- init ft/final" in lineage(run_dir) and "handed on for small" in lineage(run_dir)
    assert "small: hands on ft (fallback ft)" in status(run_dir)


def test_variants_run_and_the_best_goes_on(tmp_path: Path, scored: FakeBackend,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    variants = "    variants: {grid: {train.lr: [6.0e-4, 9.0e-4, 7.0e-4]}, select: {min: eval_loss}}"
    manifest, run_dir = write(tmp_path, ft_extra=variants), tmp_path / "r"
    assert run("run", manifest, "--run-dir", run_dir) == 0
    assert "variants by min eval_loss: ft@v1 0.4, ft@v2 0.1, ft@v3 0.3; chosen ft@v2" in capsys.readouterr().out
    led = read(run_dir)
    assert [led["stages"][f"ft@v{k}"]["state"] for k in (1, 2, 3)] == ["done"] * 3 and "ft" not in led["stages"]
    assert led["stages"]["small"]["inputs"]["init"]["stage"] == "ft@v2"
    assert [Spec.load(stage_dir(run_dir, f"ft@v{k}") / "spec.json").train.lr for k in (1, 2, 3)] == [6e-4, 9e-4, 7e-4]  # type: ignore[union-attr]
    assert read_result(stage_dir(run_dir, "ft@v2"), led["stages"]["ft@v2"]["fingerprint"]) is not None


@pytest.mark.parametrize(("extra", "says"), [
    ("    gate: {require: accuracy >== 0.8}",
     "stages[2].gate.require[0]: 'accuracy >== 0.8': unexpected '= 0.8' at character 12"),
    ("    gate: {require: acc >= 0.8}", "unknown metric 'acc': stage 'ft' (classify) reports accuracy, eval_loss, "
     "heldout/accuracy, heldout/eval_loss, heldout/macro_f1, macro_f1"),
    ("    gate: {require: accuracy >= teacher.accuracy}", "teacher.accuracy: 'teacher' is neither upstream, an input"),
    ("    gate: {require: accuracy >= upstream.accuracy}", "upstream.accuracy: unknown metric 'accuracy': stage 'pre' "
     "(mlm) reports eval_loss, perplexity"),
    ("    gate: {require: accuracy >= 0.8, on_fail: fallback, fallback: after}", "'after' is no earlier stage"),
    ("    gate: {require: accuracy >= 0.8, on_fail: retry}", "retry needs retries"),
    ("    gate: {require: accuracy >= 0.8, on_fail: retry, retries: [{train.lrr: 1.0}]}",
     "stages[2].gate.retries[0].train.lrr: ft@2: train.lrr: Extra inputs are not permitted"),
    ("    gate: {require: accuracy >= 0.8, on_fail: retry, retries: [{name: x}]}", "not name, kind, gate, variants"),
    ("    variants: {grid: {train.lr: [1.0e-4]}, select: {max: f1}}", "stages[2].variants.select.max: unknown metric"),
])
def test_bad_gates_and_variants_are_refused_with_their_line(tmp_path: Path, extra: str, says: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write(tmp_path, ft_extra=extra)
    assert run("validate", manifest) == 2
    err = capsys.readouterr().err
    line = MANIFEST.count("\n", 0, MANIFEST.index("{ft_extra}")) + 1  # where the gate or variants are written
    assert f"{manifest}:{line} " in err and says in err, err


# ----------------------------------------------------------------- with real stages


@pytest.mark.e2e
def test_real_stages_take_every_decision_and_replay_them(gates_run: dict[str, Any], hf_env: dict[str, str]) -> None:
    run_dir = gates_run["run_dir"]
    led = read(run_dir)
    expected_decisions(led)
    assert "last@2" not in led["stages"]  # its gate passed at once
    assert "== last@2: skip (not needed: last passed its gate)" in gates_run["out"]
    # the tokenizer a stage hands on does not depend on whether it tokenized its data or found it in the run's cache
    # (finetune@v1 tokenized, @v2 found v1's): no truncation left set on it by the last call
    v1, v2 = (stage_dir(run_dir, n) / "final" / "tokenizer.json" for n in ("finetune@v1", "finetune@v2"))
    assert v1.read_bytes() == v2.read_bytes()
    again = baton("run", gates_run["manifest"], "--run-dir", run_dir, env=hf_env)
    assert "nothing to do" in again.stdout and read(run_dir)["decisions"] == led["decisions"]


@pytest.mark.e2e
def test_a_kill_in_the_middle_of_a_real_retry_resumes_that_attempt(gates_run: dict[str, Any], hf_env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """The gates run up to its retried stage (the stages after it take no part in the retry): pretrain@2 stopped
    mid-training, the rerun resumes it without running pretrain again or deciding anew, to bitwise the weights of
    the uninterrupted run."""
    (tmp_path / "data").symlink_to(gates_run["root"] / "data")
    manifest = tmp_path / "gates.yaml"
    text = gates_run["manifest"].read_text()
    manifest.write_text(text[:text.index("  - name: finetune\n")])
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(manifest), "--run-dir", str(run_dir)],
                            env=hf_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    step = wait_for_checkpoint(run_dir, "pretrain@2", hf_env, min_step=4)
    os.kill(proc.pid, signal.SIGTERM)  # the retry, stopped as Ctrl-C or a scheduler stops it
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert entries(run_dir)["pretrain@2"]["state"] == "preempted"

    again = baton("run", manifest, "--run-dir", run_dir, env=hf_env).stdout
    assert "== pretrain: skip (done, unchanged)" in again, again
    led, whole = read(run_dir), read(gates_run["run_dir"])
    resumed = led["stages"]["pretrain@2"]["attempts"][1]["resumed_from"]
    assert resumed is not None and int(resumed.removeprefix("step")) >= step
    assert len(led["stages"]["pretrain"]["attempts"]) == 1  # not run again, its decision replayed
    for name in ("pretrain", "pretrain@2"):  # the same stages as in the whole run
        assert led["stages"][name]["fingerprint"] == whole["stages"][name]["fingerprint"], name
    assert timeless(led["decisions"]["pretrain"]["events"]) == timeless(whole["decisions"]["pretrain"]["events"])
    assert_same_weights(final_weights(gates_run["run_dir"], "pretrain@2"), final_weights(run_dir, "pretrain@2"))


@pytest.mark.e2e
@pytest.mark.browser
def test_the_report_of_a_real_run_renders_in_a_browser(gates_run: dict[str, Any], hf_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    from tests import browser

    out = tmp_path / "report.html"
    assert baton("report", gates_run["run_dir"], "-o", out, env=hf_env).stdout.strip() == str(out)
    page = out.read_text()
    assert "retry as pretrain@2" in page and "chosen finetune@v" in page and "heldout/accuracy" in page
    stages = list(read(gates_run["run_dir"])["stages"])
    found = browser.check_report(out, stages, plots=3)
    assert found["switched"]  # the training curves go from steps to tokens
    assert dict(found["tables"])["attempts"] == sum(len(e["attempts"]) for e in entries(gates_run["run_dir"]).values())


@pytest.mark.e2e
def test_lineage_shows_the_real_runs_retry_variants_and_fallback(gates_run: dict[str, Any],
                                                                 hf_env: dict[str, str]) -> None:
    import xml.etree.ElementTree as ET

    run_dir = gates_run["run_dir"]
    led = read(run_dir)
    chosen = led["decisions"]["finetune"]["events"][0]["chosen"]
    g = json.loads(baton("lineage", run_dir, "--json", env=hf_env).stdout)
    assert [n["name"] for n in g["nodes"]] == list(led["stages"])
    gates = {n["name"]: n["gate"] for n in g["nodes"]}
    assert (gates["pretrain"], gates["pretrain@2"], gates[chosen], gates["prune"]) == (
        "failed", "passed", "selected", "failed")
    handed = {(e["from"], e["to"], e["key"]): (e["named"], e["handed_on"], e["digest"]) for e in g["edges"]}
    out = {n: led["stages"][n]["output"]["digest"] for n in ("pretrain@2", chosen)}
    assert handed["stage:pretrain@2", f"stage:{chosen}", "init"] == ("pretrain", "passed", out["pretrain@2"])
    assert handed[f"stage:{chosen}", "stage:prune", "init"] == ("finetune", "selected", out[chosen])
    assert handed[f"stage:{chosen}", "stage:last", "init"] == ("prune", "fallback", out[chosen])
    assert {e["state"] for e in g["edges"]} == {"ok"}  # a real run: every final/ as recorded
    decided = {d["stage"]: d for d in g["decisions"]}
    assert [e["action"] for e in decided["pretrain"]["events"]] == ["retry", "pass"]
    assert decided["prune"]["outcome"] == "fallback" and decided["prune"]["hand_on"] == chosen

    svg = baton("lineage", run_dir, "--format", "svg", env=hf_env).stdout
    shown = " ".join(t.text or "" for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text"))
    assert "retry" in shown and "selected for finetune" in shown and "fallback for prune" in shown
    assert all(n in shown for n in led["stages"]) and "gate failed" in shown
