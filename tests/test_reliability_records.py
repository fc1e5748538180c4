"""The run's record survives what a user types: no command writes over a file baton keeps in a run folder, the
ledger keeps its previous generation, damage found in a done stage's output is recorded and repaired, a stop is a
stop whenever it lands, and a full disk ends in one line with the ledger consistent.

The driver runs in-process (`baton run`) with the stand-in back-end of `test_reliability_launcher`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import launcher.attempts
import launcher.ledger
import launcher.pipeline
import launcher.report
from contract.layout import stage_dir, write_bad_input
from contract.spec import Spec
from launcher import lineage
from launcher.backends.local import LocalBackend
from launcher.errors import ConfigError
from launcher.ledger import LEDGER, Ledger, read
from launcher.plan import make_plan
from tests import test_reliability_launcher as base
from tests.test_ledger_plan import stages_of, write_manifest
from tests.test_reliability_launcher import FakeBackend, flip_a_byte, run

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


# ----------------------------------------------------------------- (2) damage that keeps size and mtime


def substitute_in_place(path: Path) -> None:
    """One flipped bit, the file's size and mtime kept: invisible to a stat."""
    st = path.stat()
    flip_a_byte(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_records_damage_that_keeps_size_and_mtime_and_the_next_run_repairs_it(
        done: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, manifest = done["run_dir"], done["manifest"]
    substitute_in_place(stage_dir(run_dir, "pre") / "final" / "model.safetensors")
    assert run("run", manifest, "--run-dir", run_dir, "--dry-run") == 0  # a stat cannot see it
    assert "2. pre [mlm] SKIP" in capsys.readouterr().out

    assert run("verify", run_dir) == 1
    out = capsys.readouterr().out
    assert "pre: DAMAGED" in out and "recorded as damaged: pre; the next `baton run` reruns it" in out
    entry = read(run_dir)["stages"]["pre"]
    assert entry["state"] == "damaged" and entry["damage"].startswith("final/ holds ")
    assert entry["output"]["digest"]  # what it was, for the lineage
    assert run("verify", run_dir) == 1  # still damaged, recorded once
    capsys.readouterr()

    status = launcher.report.status(run_dir)
    assert [line.split()[2] for line in status.splitlines() if line.startswith("pre ")] == ["damaged"]
    text = lineage.text(lineage.graph(run_dir))
    assert "pre [mlm] damaged" in text
    assert "(DAMAGED)" in text.split("<- init pre/final")[1].splitlines()[0]

    assert run("run", manifest, "--run-dir", run_dir, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "2. pre [mlm] RERUN: output damaged: final/ holds " in out
    assert "3. cls [classify] RERUN: input from pre will change" in out
    with pytest.raises(ConfigError, match="output of pre, which is damaged"):
        make_plan(done["stages"], read(run_dir), run_dir, only="cls")

    assert run("run", manifest, "--run-dir", run_dir) == 0
    assert {n: e["state"] for n, e in read(run_dir)["stages"].items()} == {"tok": "done", "pre": "done", "cls": "done"}
    # the plan is made again after pre: its new final/ is the old one's bytes (the stand-in is deterministic), so
    # cls's input is unchanged and cls is kept
    assert {n: len(e["attempts"]) for n, e in read(run_dir)["stages"].items()} == {"tok": 1, "pre": 2, "cls": 1}
    assert "damage" not in read(run_dir)["stages"]["pre"]
    assert run("verify", run_dir) == 0


def test_a_stage_refusing_its_input_digest_marks_the_upstream_damaged(done: dict[str, Any], backend: FakeBackend,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The stand-in stage refuses pre's final/ the way a real one does (error.json naming the input); the driver
    records pre as damaged, and the next run reruns pre and then cls."""
    run_dir = done["run_dir"]
    substitute_in_place(stage_dir(run_dir, "pre") / "final" / "model.safetensors")
    changed = write_manifest(done["root"], cls_lr=1e-3)
    assert run("run", changed, "--run-dir", run_dir) == 2
    out = capsys.readouterr().out
    assert "== cls: bad input: inputs.init.digest: " in out
    assert "== pre: recorded as damaged (cls found its final/ with digest " in out
    assert "the next `baton run` reruns it and its descendants" in out
    stages = read(run_dir)["stages"]
    assert stages["pre"]["state"] == "damaged" and "found by cls" in stages["pre"]["damage"]
    assert "baton: " not in capsys.readouterr().err

    assert run("run", changed, "--run-dir", run_dir) == 0
    out = capsys.readouterr().out
    assert "== pre (mlm): rerun (output damaged: " in out and "== cls (classify): " in out
    assert {n: e["state"] for n, e in read(run_dir)["stages"].items()} == {"tok": "done", "pre": "done", "cls": "done"}
    assert run("verify", run_dir) == 0


@pytest.mark.e2e
def test_a_real_stage_refusing_a_damaged_input_marks_it_damaged(done: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 hf_env: dict[str, str]) -> None:
    """A real classify stage under torchrun meets pre's final/ with a flipped bit: exit 2 before it
    loads anything, and the error.json it writes names the input, so the driver marks pre damaged."""
    from launcher.backends.local import LocalBackend

    monkeypatch.setattr(launcher.pipeline, "LocalBackend", LocalBackend)
    run_dir = done["run_dir"]
    substitute_in_place(stage_dir(run_dir, "pre") / "final" / "model.safetensors")
    assert run("run", write_manifest(done["root"], cls_lr=1e-3), "--run-dir", run_dir) == 2
    stages = read(run_dir)["stages"]
    assert stages["cls"]["attempts"][-1]["error"].startswith("inputs.tokenizer.digest: ")
    assert stages["pre"]["state"] == "damaged" and "found by cls" in stages["pre"]["damage"]


# ----------------------------------------------------------------- (5) a full disk


def test_a_stage_that_finds_the_disk_full_is_one_line_exit_2_and_keeps_its_checkpoints(
        done: dict[str, Any], backend: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    """The stage's error.json says the disk was full (not a bad input): exit 2, state failed, the attempt's
    progress kept (no previous output put back over it), and the next run resumes."""
    run_dir = done["run_dir"]

    def disk_full(spec: Spec, log_dir: Path) -> int:
        folder = Path(spec.stage_dir)
        (folder / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0}) + "\n")
        tag = folder / "ckpt" / "step00000008"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text(json.dumps({"step": 8, "samples": 32, "fingerprint": spec.fingerprint}))
        write_bad_input(folder, f"no space left on device while saving step 16 to {folder}/ckpt/step00000016; "
                                "step 8 is intact", no_space=True)
        return 1

    backend.act = disk_full
    changed = write_manifest(done["root"], cls_lr=1e-3)
    assert run("run", changed, "--run-dir", run_dir) == 2
    out, err = capsys.readouterr()
    folder = stage_dir(run_dir, "cls")
    assert (f"== cls: no space left on device while saving step 16 to {folder}/ckpt/step00000016; step 8 is "
            "intact; free space and run again: it resumes from the newest intact checkpoint") in out
    assert "bad input" not in out and "Traceback" not in out + err
    entry = read(run_dir)["stages"]["cls"]
    assert entry["state"] == "failed" and "kept_previous" not in entry["attempts"][-1]
    assert (folder / "ckpt" / "step00000008" / "COMPLETE").is_file() and not (folder / "previous").exists()
    assert [s.action for s in make_plan(stages_of(changed), read(run_dir), run_dir)] == ["skip", "skip", "resume"]


def test_the_driver_survives_a_full_disk_with_one_line_and_a_consistent_ledger(
        done: dict[str, Any], backend: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The disk fills while the stage runs: the driver cannot record the end. One line, exit 2, the ledger on disk
    the whole one from before (the stage running), no lock and no temp file left; with space again, the next run
    records the stage's result and goes on."""
    run_dir = done["run_dir"]
    full = {"now": False}
    real_write = launcher.ledger.write_atomic

    def write(path: Any, data: Any) -> None:
        if full["now"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    def fills_the_disk(spec: Spec, log_dir: Path) -> int:
        code = base.play_stage(spec, log_dir)
        full["now"] = True
        return code

    monkeypatch.setattr(launcher.ledger, "write_atomic", write)
    backend.act = fills_the_disk
    changed = write_manifest(done["root"], cls_lr=1e-3)
    assert run("run", changed, "--run-dir", run_dir) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"baton: {run_dir / LEDGER}: no space left on device to save the ledger; it "
                                "still holds the run as it was before this change; free space and run "
                                "`baton run` again"], err
    assert "Traceback" not in out
    assert read(run_dir)["stages"]["cls"]["state"] == "running"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []

    full["now"] = False
    assert run("run", changed, "--run-dir", run_dir) == 0
    assert read(run_dir)["stages"]["cls"]["state"] == "done"
    assert len(read(run_dir)["stages"]["cls"]["attempts"]) == 2  # adopted, not run again

    # any other write of the driver's on a full disk (here the spec of a stage about to run) is one line too
    def no_room_for_specs(path: Any, data: Any) -> None:
        if str(path).endswith("spec.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(launcher.attempts, "write_atomic", no_room_for_specs)
    assert run("run", write_manifest(done["root"], cls_lr=2e-3), "--run-dir", run_dir) == 2
    err = capsys.readouterr().err
    assert err == f"baton: no space left on device writing {stage_dir(run_dir, 'cls') / 'spec.json'}; free space " \
                  "and run again\n", err
    assert not (run_dir / ".baton.lock").exists()
    # what starting over had set aside is back: the ledger and the folder agree, as before the attempt
    assert read(run_dir)["stages"]["cls"]["state"] == "done" and not (stage_dir(run_dir, "cls") / "previous").exists()
    assert run("verify", run_dir) == 0


# ----------------------------------------------------------------- (6) a stop is a stop, whenever it lands


class Sleeper(LocalBackend):
    """The local back-end (its real signal forwarding), launching a process that has no handler for SIGTERM yet,
    as a rank still importing torch: the stop request kills it."""

    def __init__(self, up: Path) -> None:
        self.up = up

    def command(self, kind: str, spec_path: Path, nproc_per_node: int, log_dir: Path, nnodes: int = 1) -> list[str]:
        return [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(self.up)!r}).touch(); time.sleep(60)"]


def test_ctrl_c_while_a_stage_starts_is_75_and_preempted(done: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = done["run_dir"]
    up = tmp_path / "up"
    monkeypatch.setattr(launcher.pipeline, "LocalBackend", lambda: Sleeper(up))

    def ctrl_c() -> None:
        deadline = time.monotonic() + 60
        while not up.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends the driver

    threading.Thread(target=ctrl_c, daemon=True).start()
    assert run("run", write_manifest(done["root"], cls_lr=1e-3), "--run-dir", run_dir) == 75
    out, err = capsys.readouterr()
    assert "baton: SIGINT: asking the stage to checkpoint and stop" in err
    assert "== cls: stopped on the signal before it had anything to keep; running it again starts it over" in out
    entry = read(run_dir)["stages"]["cls"]
    assert entry["state"] == "preempted"
    attempt = entry["attempts"][-1]
    assert (attempt["exit_code"], attempt["outcome"], attempt["launcher_exit_code"]) == (75, "preempted", -15)

    from launcher import htmlreport

    table = htmlreport.attempts_table(read(run_dir))
    row = table.split("<tr>")[-1]
    assert "<td>75 (torchrun: -15)</td>" in row and "preempted" in row, row  # the terminal's 75, torchrun's beside


def test_a_stage_killed_by_a_signal_nobody_asked_for_fails_with_128_plus_the_signal(
        done: dict[str, Any], backend: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    backend.act = lambda spec, log_dir: -signal.SIGKILL  # torchrun killed (the OOM killer, say)
    assert run("run", write_manifest(done["root"], cls_lr=1e-3), "--run-dir", done["run_dir"]) == 137
    out = capsys.readouterr().out
    assert "== cls: killed by SIGKILL; logs in " in out
    assert read(done["run_dir"])["stages"]["cls"]["state"] == "done"  # before its input checks: the old output kept


# ----------------------------------------------------------------- (7) what status says


def test_status_after_a_failed_rerun_shows_no_negative_start_up(done: dict[str, Any], backend: FakeBackend,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The old attempt's records come back with its output; the new attempt never took a step: its start-up is
    unknown, not the old first step's time minus the new launch."""
    run_dir = done["run_dir"]
    with open(stage_dir(run_dir, "cls") / "metrics.jsonl", "a") as f:  # the first attempt's first step, long ago
        f.write(json.dumps({"event": "first_step", "time": time.time() - 1655}) + "\n")
    backend.act = lambda spec, log_dir: 1  # crashes before its input checks: the old output comes back
    assert run("run", write_manifest(done["root"], cls_lr=1e-3), "--run-dir", run_dir) == 1
    row = next(s for s in launcher.report.status_data(run_dir)["stages"] if s["name"] == "cls")
    assert "startup_s" not in row["progress"]
    line = next(line for line in launcher.report.status(run_dir, wide=True).splitlines() if line.startswith("cls "))
    assert line.rstrip().endswith(" -") and "-1655" not in line, line  # the start-up column (--wide) says none


def test_a_running_stage_whose_driver_is_gone_shows_as_interrupted(done: dict[str, Any]) -> None:
    run_dir = done["run_dir"]
    with Ledger(run_dir) as led:  # what a driver killed with SIGKILL leaves: the stage running, its lock gone
        led.data["stages"]["cls"]["state"] = "running"
        led.save()
    assert [s["state"] for s in launcher.report.status_data(run_dir)["stages"]] == ["done", "done", "interrupted"]
    assert re.search(r"^cls +classify +interrupted ", launcher.report.status(run_dir), re.M)
    assert "cls [classify] interrupted" in lineage.text(lineage.graph(run_dir))
    with Ledger(run_dir):  # a live driver holds the run: then it is running
        assert launcher.report.status_data(run_dir)["stages"][2]["state"] == "running"
    assert read(run_dir)["stages"]["cls"]["state"] == "running"  # shown so, never written so


def test_resumed_from_names_the_checkpoint_the_stage_resumed_from(done: dict[str, Any], backend: FakeBackend,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The newest complete checkpoint is damaged: the stage passes over it for the one before. The attempt
    records the one it used, and the one passed over."""
    run_dir = done["run_dir"]

    def stopped_with_two_checkpoints(spec: Spec, log_dir: Path) -> int:
        for step in (8, 16):
            tag = Path(spec.stage_dir) / "ckpt" / f"step{step:08d}"
            tag.mkdir(parents=True)
            (tag / "COMPLETE").write_text(json.dumps({"step": step, "fingerprint": spec.fingerprint}))
        return 75

    def resumes_from_8(spec: Spec, log_dir: Path) -> int:
        with open(Path(spec.stage_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"event": "start", "time": time.time(), "step": 8, "max_steps": 24}) + "\n")
        return base.play_stage(spec, log_dir)

    changed = write_manifest(done["root"], cls_lr=1e-3)
    backend.act = stopped_with_two_checkpoints
    assert run("run", changed, "--run-dir", run_dir) == 75
    backend.act = resumes_from_8
    assert run("run", changed, "--run-dir", run_dir) == 0
    attempt = read(run_dir)["stages"]["cls"]["attempts"][-1]
    assert attempt["resumed_from"] == "step00000008" and attempt["passed_over"] == ["step00000016"]
