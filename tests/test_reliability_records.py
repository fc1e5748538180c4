"""The run's record survives what a user types: no command writes over a file baton keeps in a run folder, the
ledger keeps its previous generation, damage found in a done stage's output is recorded and repaired, a stop is a
stop whenever it lands, and a full disk ends in one line with the ledger consistent.

The driver runs in-process (`baton run`) with the stand-in back-end of `test_reliability_launcher`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from contract.layout import stage_dir
from launcher.ledger import LEDGER, Ledger, read
from tests import test_reliability_launcher as base
from tests.test_reliability_launcher import run

backend, done = base.backend, base.done  # the fixtures: a stand-in back-end; tok -> pre -> cls done through it

# ----------------------------------------------------------------- (1) no -o over what baton keeps


OWNED = ["ledger.json", "ledger.json.1", "manifest.yaml", "stages/pre/spec.json", "stages/pre/result.json",
         "stages/pre/metrics.jsonl", "stages/pre/eval.json", "stages/pre/final/model.safetensors",
         "stages/pre/final/new.bin", "stages/pre/ckpt/LATEST", "stages/cls/eval_predictions.jsonl"]


def test_no_output_flag_writes_over_a_file_the_run_keeps(done: dict[str, Any],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = done["run_dir"]
    (run_dir / "ledger.json.1").touch()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for target in OWNED:
        for command in (["report", run_dir], ["lineage", run_dir], ["schema"]):
            assert run(*command, "-o", run_dir / target) == 2, (command, target)
            err = capsys.readouterr().err
            assert f"baton: -o {run_dir / target}: " in err and "baton keeps" in err, err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert run("status", run_dir) == 0


def test_output_flag_may_write_beside_the_run_and_through_a_link_is_judged_by_where_it_lands(
        done: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = done["run_dir"]
    assert run("report", run_dir) == 0 and (run_dir / "report.html").is_file()  # the default place
    assert run("lineage", run_dir, "-o", run_dir / "lineage.txt") == 0
    assert run("schema", "-o", tmp_path / "schema.json") == 0
    (tmp_path / "into-run").symlink_to(stage_dir(run_dir, "pre"))
    assert run("lineage", run_dir, "-o", tmp_path / "into-run" / "result.json") == 2
    assert json.loads((stage_dir(run_dir, "pre") / "result.json").read_text())["status"] == "done"


# ----------------------------------------------------------------- (1) the ledger's previous generation


def test_each_save_keeps_the_previous_ledger_as_ledger_json_1(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        led.stage("a")["note"] = 1
        led.save()
        assert not (tmp_path / f"{LEDGER}.1").exists()  # nothing before the first save
        led.stage("a")["note"] = 2
        led.save()
        led.stage("a")["note"] = 3
        led.save()
    assert read(tmp_path)["stages"]["a"]["note"] == 3
    assert json.loads((tmp_path / f"{LEDGER}.1").read_text())["stages"]["a"]["note"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, f"{LEDGER}.1"]


def test_an_unreadable_ledger_is_offered_its_previous_generation(done: dict[str, Any],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, manifest = done["run_dir"], done["manifest"]
    html = "<!doctype html><html>not a ledger</html>"
    (run_dir / LEDGER).write_text(html)  # what `report -o RUN/ledger.json` did before it was refused
    for args in (["status", run_dir], ["run", manifest, "--run-dir", run_dir], ["lineage", run_dir]):
        assert run(*args) == 2
        err = capsys.readouterr().err
        assert "unreadable ledger" in err and f"baton restore-ledger {run_dir}" in err, err
        assert f"{LEDGER}.1" in err
    assert (run_dir / LEDGER).read_text() == html  # refused, not touched

    assert run("restore-ledger", run_dir) == 0
    out = capsys.readouterr().out
    assert f"{run_dir / LEDGER}: restored from {LEDGER}.1" in out
    assert (run_dir / f"{LEDGER}.damaged").read_text() == html  # kept for the curious
    # one save behind: cls's end had not been recorded in it; the run adopts cls's result and has nothing to do
    assert run("run", manifest, "--run-dir", run_dir) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {n: e["state"] for n, e in read(run_dir)["stages"].items()} == {"tok": "done", "pre": "done", "cls": "done"}
    assert run("verify", run_dir) == 0


def test_restore_ledger_refuses_a_readable_ledger_and_a_missing_generation(done: dict[str, Any],
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = done["run_dir"]
    before = (run_dir / LEDGER).read_bytes()
    assert run("restore-ledger", run_dir) == 2
    assert "is readable; nothing to restore" in capsys.readouterr().err
    (run_dir / LEDGER).write_text("[]")
    (run_dir / f"{LEDGER}.1").unlink()
    assert run("status", run_dir) == 2
    assert "restore-ledger" not in capsys.readouterr().err
    assert run("restore-ledger", run_dir) == 2
    assert f"no readable {LEDGER}.1" in capsys.readouterr().err
    assert before != (run_dir / LEDGER).read_bytes()
