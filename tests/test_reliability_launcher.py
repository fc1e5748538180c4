"""Launcher reliability: a failed restart keeps the old output, damaged outputs are found, attempts record versions.

The fast tests run the real driver (`baton run` in-process) with a stand-in back-end that plays a stage by the
contract: it checks its input digests (exit 2 with error.json when one is off), writes metrics.jsonl's start
record, final/, eval.json and result.json. One slow test does the same with a real tiny pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import launcher.digests
import launcher.ledger
import launcher.pipeline
import launcher.plan
import launcher.report
from contract.files import dir_digest
from contract.layout import ChangedInput, Output, Result, read_metrics, stage_dir, write_bad_input, write_result
from contract.spec import Spec
from launcher import attempts, cli, decisions, lineage
from launcher.backends.local import link_logs
from launcher.errors import ConfigError
from launcher.ledger import Ledger, read
from launcher.plan import Step, make_plan
from launcher.resolve import build_spec
from tests.conftest import WORDNET, baton, pipeline_manifest
from tests.test_ledger_plan import actions, reasons, stages_of, write_manifest

Act = Callable[[Spec, Path], int]


def play_stage(spec: Spec, log_dir: Path, metrics: dict[str, float] | None = None) -> int:
    """What a stage does, by the contract, without torch: check inputs, start, write final/ and result.json
    (`metrics`: its final metrics; default accuracy 0.5)."""
    metrics = {"accuracy": 0.5} if metrics is None else metrics
    folder = Path(spec.stage_dir)
    (log_dir / "0").mkdir(parents=True, exist_ok=True)
    (log_dir / "0" / "stderr.log").write_text(f"{spec.stage} ran\n")
    for name, ref in spec.inputs.items():
        for r in ref if isinstance(ref, list) else [ref]:
            if r.digest and r.path and Path(r.path).is_dir() and (found := dir_digest(r.path)) != r.digest:
                changed = ChangedInput(key=f"inputs.{name}", path=r.path, digest=found, expected=r.digest)
                write_bad_input(folder, f"inputs.{name}.digest: {r.path} has {found}, spec expects {r.digest}",
                                changed)
                return 1  # torchrun's code for any failing rank; error.json says it was bad input
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "start", "time": 0, "step": 0, "world_size": spec.world_size}) + "\n")
    final = folder / "final"
    final.mkdir(exist_ok=True)
    (final / "model.safetensors").write_bytes(b"weights of " + spec.fingerprint.encode() * 50)
    (final / "config.json").write_text(json.dumps({"stage": spec.stage}))
    (folder / "eval.json").write_text(json.dumps(metrics))
    write_result(folder, Result(stage=spec.stage, kind=spec.kind, fingerprint=spec.fingerprint, steps=3, samples=12,
                                output=Output(path=str(final), digest=dir_digest(final)),
                                metrics=metrics, time=0.0))
    return 0


class FakeBackend:
    """The Backend protocol, with `act` in place of torchrun."""

    name = "fake"
    stop_signal = signal.SIGTERM

    def __init__(self, act: Act = play_stage) -> None:
        self.act = act

    def command(self, kind: str, spec_path: Path, nproc_per_node: int, log_dir: Path, nnodes: int = 1) -> list[str]:
        return ["fake-torchrun", kind, str(spec_path), str(log_dir)]

    def launch(self, argv: list[str]) -> tuple[int, bool]:
        return self.act(Spec.load(argv[2]), Path(argv[3])), False


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    """`baton run` in this process launches through a FakeBackend (and skips DeepSpeed's config check)."""
    fake = FakeBackend()
    monkeypatch.setattr(launcher.pipeline, "LocalBackend", lambda: fake)
    monkeypatch.setattr(launcher.pipeline, "check_deepspeed", lambda stages: None)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(launcher.digests, "_FOLDERS", {})  # each test is a fresh process as far as hashing goes
    return fake


def run(*args: str | Path) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture
def done(tmp_path: Path, backend: FakeBackend, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """tok -> pre -> cls, all done through the driver."""
    manifest = write_manifest(tmp_path)
    run_dir = tmp_path / "run"
    assert run("run", manifest, "--run-dir", run_dir) == 0
    capsys.readouterr()
    return {"manifest": manifest, "run_dir": run_dir, "stages": stages_of(manifest), "root": tmp_path}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- (3) a failed restart keeps the old output


def bad_input(spec: Spec, log_dir: Path) -> int:
    """A stage that refuses its input before it starts: logs, error.json, torchrun's exit 1."""
    (log_dir / "0").mkdir(parents=True)
    (log_dir / "0" / "stderr.log").write_text("baton stage error: data.text_field: column 'definition' not found\n")
    write_bad_input(spec.stage_dir, "data.text_field: column 'definition' not found")
    return 1


def test_changed_stage_whose_new_attempt_exits_2_keeps_its_previous_output(
        done: dict[str, Any], backend: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = done["run_dir"]
    folder = stage_dir(run_dir, "pre")
    before_files = snapshot(folder)
    before = read(run_dir)["stages"]["pre"]
    backend.act = bad_input
    assert run("run", write_manifest(done["root"], pre_steps=20), "--run-dir", run_dir) == 2  # pre starts over
    out = capsys.readouterr().out
    assert "== pre (mlm): rerun (changed: train.max_steps 10 -> 20)" in out
    assert "bad input: data.text_field" in out and "previous output is kept (state done)" in out
    assert "== cls" not in out

    after_files = snapshot(folder)
    new_logs = {k for k in after_files if k.startswith("logs/attempt-2/")}
    assert new_logs == {"logs/attempt-2/0/stderr.log"}  # the failed attempt's logs join the old ones
    assert {k: v for k, v in after_files.items() if k not in new_logs} == before_files  # bytes identical
    assert not (folder / "previous").exists() and not (folder / "error.json").exists()

    entry = read(run_dir)["stages"]["pre"]
    assert entry["state"] == "done"
    for key in ("fingerprint", "settings", "inputs", "output", "metrics", "steps"):
        assert entry[key] == before[key], key
    assert "previous" not in entry
    assert [a["outcome"] for a in entry["attempts"]] == ["done", "failed"]
    assert entry["attempts"][-1]["kept_previous"] is True and "text_field" in entry["attempts"][-1]["error"]

    # the ledger is as valid as before the failed attempt: the old manifest has nothing to do, cls's input is intact
    steps = make_plan(done["stages"], read(run_dir), run_dir)
    assert actions(steps) == {"tok": "skip", "pre": "skip", "cls": "skip"}
    assert run("verify", run_dir) == 0


def test_an_attempt_past_its_input_checks_replaces_the_previous_output(done: dict[str, Any],
                                                                       backend: FakeBackend) -> None:
    def crash_after_start(spec: Spec, log_dir: Path) -> int:
        Path(spec.stage_dir, "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0}) + "\n")
        return 1

    backend.act = crash_after_start
    run_dir = done["run_dir"]
    assert run("run", write_manifest(done["root"], cls_lr=1e-3), "--run-dir", run_dir) == 1
    folder = stage_dir(run_dir, "cls")
    assert not (folder / "final").exists() and not (folder / "previous").exists()
    assert not (folder / "result.json").exists()
    entry = read(run_dir)["stages"]["cls"]
    assert entry["state"] == "failed" and entry["output"] is None and "previous" not in entry


def test_a_crash_before_the_input_checks_keeps_the_previous_output(done: dict[str, Any],
                                                                   backend: FakeBackend) -> None:
    backend.act = lambda spec, log_dir: 1
    run_dir = done["run_dir"]
    before = snapshot(stage_dir(run_dir, "cls"))
    assert run("run", write_manifest(done["root"], cls_lr=1e-3), "--run-dir", run_dir) == 1
    assert snapshot(stage_dir(run_dir, "cls")) == before
    assert read(run_dir)["stages"]["cls"]["state"] == "done"


def test_a_successful_restart_records_the_new_output_and_drops_the_old(done: dict[str, Any]) -> None:
    run_dir = done["run_dir"]
    old = read(run_dir)["stages"]["cls"]["output"]
    assert run("run", write_manifest(done["root"], cls_lr=1e-3), "--run-dir", run_dir) == 0
    entry = read(run_dir)["stages"]["cls"]
    final = stage_dir(run_dir, "cls") / "final"
    assert entry["state"] == "done" and entry["output"]["digest"] != old["digest"]
    assert entry["output"]["digest"] == dir_digest(final)
    assert entry["output"]["stat"] == launcher.digests.folder_stat(final)
    assert not (stage_dir(run_dir, "cls") / "previous").exists() and "previous" not in entry


def test_submit_sets_the_old_output_aside_and_the_job_puts_it_back_on_exit_2(
        done: dict[str, Any], backend: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`baton submit` moves a rerun stage's folder aside (not deletes it); the job's attempt settles it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = done["run_dir"]
    folder = stage_dir(run_dir, "cls")
    before_files, before = snapshot(folder), read(run_dir)["stages"]["cls"]

    assert run("submit", write_manifest(done["root"], cls_lr=1e-3), "--run-dir", run_dir) == 0
    entry = read(run_dir)["stages"]["cls"]
    assert entry["state"] == "queued" and entry["previous"]["state"] == "done"
    assert sorted(p.name for p in folder.iterdir()) == ["previous", "slurm"]

    # the job: a bad input this time
    backend.act = lambda spec, log_dir: write_bad_input(spec.stage_dir, "data.text_field: no such column") or 1
    spec = build_spec(done["stages"][2], run_dir, decisions.outputs_of(read(run_dir), done["stages"]))
    step = Step(done["stages"][2], "run", "job 4242", spec=spec)
    assert attempts.run_stage(step, Ledger(run_dir), run_dir, backend, {"job_id": "4242"}) == 2
    assert {k: v for k, v in snapshot(folder).items() if not k.startswith("slurm/")} == before_files
    entry = read(run_dir)["stages"]["cls"]
    assert entry["state"] == "done" and entry["output"] == before["output"] and "previous" not in entry
    assert entry["slurm"]["job_id"] == "4242"


# ----------------------------------------------------------------- (4) damaged outputs


def test_verify_says_ok_then_damaged_after_one_flipped_byte(done: dict[str, Any],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = done["run_dir"]
    assert run("verify", run_dir) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["tok", "pre", "cls"]
    assert all(": ok " in line for line in lines), lines

    recorded = read(run_dir)["stages"]["pre"]["output"]["digest"]
    flip_a_byte(stage_dir(run_dir, "pre") / "final" / "model.safetensors")
    assert run("verify", run_dir) == 1
    out = capsys.readouterr().out
    now = dir_digest(stage_dir(run_dir, "pre") / "final")
    assert (f"pre: DAMAGED: recorded {recorded.split(':')[1][:12]} now {now.split(':')[1][:12]} "
            "(final/model.safetensors changed)") in out
    assert "tok: ok" in out and "cls: ok" in out

    shutil.rmtree(stage_dir(run_dir, "tok") / "final")
    assert run("verify", run_dir) == 1
    assert "tok: missing" in capsys.readouterr().out


def test_a_damaged_stage_and_its_descendants_are_planned_as_rerun(done: dict[str, Any],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, manifest = done["run_dir"], done["manifest"]
    flip_a_byte(stage_dir(run_dir, "pre") / "final" / "model.safetensors")
    assert run("run", manifest, "--run-dir", run_dir, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "1. tok [tokenizer] SKIP: done, unchanged" in out
    assert "2. pre [mlm] RERUN: output damaged: final/model.safetensors changed since it was recorded" in out
    assert "3. cls [classify] RERUN: input from pre will change" in out

    shutil.rmtree(stage_dir(run_dir, "tok") / "final")
    steps = make_plan(done["stages"], read(run_dir), run_dir)
    assert actions(steps) == {"tok": "rerun", "pre": "rerun", "cls": "rerun"}
    assert reasons(steps)["tok"] == "output damaged: final/ is missing"


def test_the_rerun_of_a_damaged_stage_repairs_it(done: dict[str, Any]) -> None:
    run_dir, manifest = done["run_dir"], done["manifest"]
    flip_a_byte(stage_dir(run_dir, "pre") / "final" / "model.safetensors")
    assert run("run", manifest, "--run-dir", run_dir) == 0
    # the plan is made again after each stage: pre's repaired output is the recorded one, so cls's input is too
    assert {n: len(e["attempts"]) for n, e in read(run_dir)["stages"].items()} == {"tok": 1, "pre": 2, "cls": 1}
    assert run("verify", run_dir) == 0


@pytest.mark.parametrize("flag", ["--only", "--from"])
def test_a_damaged_upstream_that_is_not_selected_is_refused(done: dict[str, Any], flag: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = done["run_dir"]
    flip_a_byte(stage_dir(run_dir, "pre") / "final" / "model.safetensors")
    assert run("run", done["manifest"], "--run-dir", run_dir, flag, "cls") == 2
    err = capsys.readouterr().err
    assert "stage cls needs the output of pre, which is damaged (final/model.safetensors changed" in err
    assert "rerun pre first" in err
    with pytest.raises(ConfigError, match="output of pre, which is damaged"):
        make_plan(done["stages"], read(run_dir), run_dir, only="cls")
    # a selected stage whose upstream is intact is not held up by damage elsewhere
    assert actions(make_plan(done["stages"], read(run_dir), run_dir, only="pre"))["pre"] == "rerun"


def test_an_output_whose_stat_matches_is_not_hashed_again(done: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = done["run_dir"]
    hashed: list[str] = []

    def counting(path: str | os.PathLike[str]) -> str:
        hashed.append(Path(path).parent.name)
        return dir_digest(path)

    monkeypatch.setattr(launcher.digests, "dir_digest", counting)
    steps = make_plan(done["stages"], read(run_dir), run_dir)
    assert actions(steps) == {"tok": "skip", "pre": "skip", "cls": "skip"} and hashed == []

    # a touched file (same bytes, new mtime) is hashed once, found intact, and its new stat recorded
    config = stage_dir(run_dir, "tok") / "final" / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    for _ in range(2):  # `baton run` plans twice (before and under the lock): one hash
        steps = make_plan(done["stages"], read(run_dir), run_dir)
        assert actions(steps) == {"tok": "skip", "pre": "skip", "cls": "skip"}
    assert hashed == ["tok"]
    assert run("run", done["manifest"], "--run-dir", run_dir) == 0  # nothing to do, but the stat is kept
    assert hashed == ["tok"]
    monkeypatch.setattr(launcher.digests, "_FOLDERS", {})  # a later process
    make_plan(done["stages"], read(run_dir), run_dir)
    assert hashed == ["tok"]


def test_a_ledger_without_stat_records_is_hashed_once(done: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = done["run_dir"]
    with Ledger(run_dir) as led:  # as written before stat records existed
        for entry in led.data["stages"].values():
            del entry["output"]["stat"]
        led.save()
    hashed: list[str] = []
    monkeypatch.setattr(launcher.digests, "dir_digest", lambda p: hashed.append(Path(p).parent.name) or dir_digest(p))
    assert run("run", done["manifest"], "--run-dir", run_dir) == 0
    assert sorted(hashed) == ["cls", "pre", "tok"]
    assert all(e["output"]["stat"] for e in read(run_dir)["stages"].values())
    monkeypatch.setattr(launcher.digests, "_FOLDERS", {})
    assert run("run", done["manifest"], "--run-dir", run_dir) == 0
    assert sorted(hashed) == ["cls", "pre", "tok"]


def _lineage(run_dir: Path) -> str:
    return lineage.text(lineage.graph(run_dir))


def test_status_and_lineage_show_changed_files_without_hashing(done: dict[str, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = done["run_dir"]

    def refuse(path: object) -> str:
        raise AssertionError("status and lineage must not hash")

    monkeypatch.setattr(launcher.digests, "dir_digest", refuse)
    monkeypatch.setattr(launcher.report, "dir_digest", refuse)
    assert _lineage(run_dir).count("(ok)") == 3
    assert "CHANGED" not in launcher.report.status(run_dir)

    flip_a_byte(stage_dir(run_dir, "pre") / "final" / "model.safetensors")
    text = _lineage(run_dir)
    assert "<- init pre/final" in text and "(CHANGED ON DISK)" in text.split("<- init pre/final")[1].splitlines()[0]
    assert text.count("(ok)") == 1  # tok -> pre's tokenizer
    status = launcher.report.status(run_dir)
    assert [line.split()[2:5] for line in status.splitlines() if line.startswith("pre ")] == \
        [["done", "(CHANGED", "ON"]]

    shutil.rmtree(stage_dir(run_dir, "tok") / "final")
    assert "done (final/ MISSING)" in launcher.report.status(run_dir)


# ----------------------------------------------------------------- (9) what an attempt ran with


def test_each_attempt_records_versions_host_and_platform(done: dict[str, Any]) -> None:
    import importlib.metadata
    import platform
    import socket

    for name, entry in read(done["run_dir"])["stages"].items():
        attempt = entry["attempts"][-1]
        assert attempt["host"] == socket.gethostname() and attempt["platform"] == platform.platform(), name
        versions = attempt["versions"]
        assert versions["python"] == platform.python_version()
        for package in ("baton", "torch", "deepspeed", "transformers", "datasets"):
            assert versions[package] == importlib.metadata.version(package), package
    assert "torch" not in attempts.__dict__  # read from metadata, never imported by the launcher


def test_a_kept_stage_made_under_other_versions_is_warned_about(done: dict[str, Any],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = done["run_dir"]
    now = attempts.versions()
    with Ledger(run_dir) as led:
        made = led.data["stages"]["pre"]["attempts"][-1]["versions"]
        made.update(torch="2.12.0", deepspeed="0.18.0")
        led.save()
    assert run("run", done["manifest"], "--run-dir", run_dir) == 0
    out = capsys.readouterr().out
    assert f"== pre: made with torch 2.12.0, deepspeed 0.18.0; now torch {now['torch']}, " \
           f"deepspeed {now['deepspeed']}" in out
    assert "nothing to do" in out and "== tok:" not in out and "== cls:" not in out

    # the same for a stage skipped while another one runs
    assert run("run", write_manifest(done["root"], cls_lr=1e-3), "--run-dir", run_dir) == 0
    out = capsys.readouterr().out
    assert "== pre: skip (done, unchanged)\n== pre: made with torch 2.12.0" in out


# ----------------------------------------------------------------- logs at stable paths


def crash_as_torchrun_does(spec: Spec, log_dir: Path) -> int:
    """A stage that crashes, its two ranks' logs where torchrun puts them: under its run id and a random suffix."""
    for rank in (0, 1):
        folder = log_dir / "4f0c2a9e-run_x7k2p1" / "attempt_0" / str(rank)
        folder.mkdir(parents=True)
        (folder / "stdout.log").write_text(f"rank {rank} out\n")
        (folder / "stderr.log").write_text(f"RuntimeError: rank {rank} fell over\n")
    return 1


def test_a_failed_attempt_names_rank_0s_stderr_at_a_stable_path(tmp_path: Path, backend: FakeBackend,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    backend.act = crash_as_torchrun_does
    run_dir = tmp_path / "run"
    assert run("run", write_manifest(tmp_path), "--run-dir", run_dir) == 1
    out = capsys.readouterr().out
    attempt = stage_dir(run_dir, "tok") / "logs" / "attempt-1"
    assert f"== tok: failed with exit code 1; rank 0's stderr: {attempt / 'rank-0.stderr'} (" in out
    assert f"the end of rank 0's stderr ({attempt / 'rank-0.stderr'}):\nRuntimeError: rank 0 fell over" in out
    for rank in (0, 1):
        assert (attempt / f"rank-{rank}.stderr").read_text() == f"RuntimeError: rank {rank} fell over\n"
        assert (attempt / f"rank-{rank}.stdout").read_text() == f"rank {rank} out\n"
        assert not os.path.isabs(os.readlink(attempt / f"rank-{rank}.stderr"))  # the run folder may move


def test_on_several_nodes_rank_0_is_the_local_rank_0_that_printed(tmp_path: Path) -> None:
    for node, printed in (("a_1", ""), ("b_2", "step 1/4\n")):
        folder = tmp_path / node / "attempt_0" / "0"
        folder.mkdir(parents=True)
        (folder / "stdout.log").write_text(printed)
        (folder / "stderr.log").write_text(f"node {node}\n")
    assert link_logs(tmp_path) == tmp_path / "rank-0.stderr"
    assert (tmp_path / "rank-0.stderr").read_text() == "node b_2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_1", "b_2", "rank-0.stderr", "rank-0.stdout"]
    assert link_logs(tmp_path / "a_1" / "attempt_0") is None  # no torchrun logs: nothing linked


# ----------------------------------------------------------------- the real thing


@pytest.mark.e2e
def test_real_stage_exiting_2_keeps_its_previous_output(tiny_run: dict[str, Any], hf_env: dict[str, str]) -> None:
    """A real classify stage rerun on eval data with a label the training data never has, far past the rows that
    validate samples, exits 2 under torchrun naming the file and row; its old output stays."""
    root = tiny_run["root"]
    run_dir = root / "run-kept"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    assert baton("verify", run_dir, env=hf_env).stdout.count(": ok ") == 3
    folder = run_dir / "stages" / "finetune"
    before_files = snapshot(folder)
    before = json.loads((run_dir / "ledger.json").read_text())["stages"]["finetune"]
    assert before["attempts"][0]["versions"]["torch"]  # recorded by the run that made it

    bad = root / "bad-finetune.yaml"
    rows = [json.loads(line) for line in (root / "data" / "eval.jsonl").read_text().splitlines()]
    assert len(rows) > 100  # validate samples the first 100 rows of a file
    rows[110]["label"] = "noun.unheard-of"
    (root / "data" / "eval-bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = pipeline_manifest()
    line = "data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 32}"
    assert line in text
    bad.write_text(text.replace(line, line.replace("eval.jsonl", "eval-bad.jsonl")))
    proc = baton("run", bad, "--run-dir", run_dir, env=hf_env, check=False)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"bad input: data: {root / 'data' / 'eval-bad.jsonl'}: row 111: label 'noun.unheard-of' is not " \
           "one of animal, " in proc.stdout and "(the training data's labels)" in proc.stdout
    assert "previous output is kept" in proc.stdout
    assert not [noise for noise in TORCHRUN_NOISE if noise in proc.stdout + proc.stderr], proc.stdout + proc.stderr

    after_files = snapshot(folder)
    kept = {k: v for k, v in after_files.items() if not k.startswith("logs/attempt-2/")}
    assert kept == before_files  # final/, result.json, eval.json, metrics.jsonl, spec.json and the old logs
    assert any(k.startswith("logs/attempt-2/") for k in after_files)
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"]["finetune"]
    assert entry["state"] == "done" and entry["output"] == before["output"]
    assert [a["outcome"] for a in entry["attempts"]] == ["done", "failed"]
    assert baton("verify", run_dir, env=hf_env).stdout.count(": ok ") == 3
    out = baton("run", tiny_run["manifest"], "--run-dir", run_dir, env=hf_env).stdout
    assert "nothing to do" in out


# ----------------------------------------------------------------- the terminal, a stop request, real stages


def tokenizer_manifest(folder: Path, data: str, *, vocab: int = 600, extra: str = "") -> Path:
    """A one-stage manifest: a SentencePiece tokenizer (one process, no checkpoints) on `data`."""
    path = folder / "tok.yaml"
    path.write_text(f"""version: 1
run: {{name: tok}}
stages:
  - name: tok
    kind: tokenizer
    data: {{train: {data}{extra}}}
    sentencepiece: {{vocab_size: {vocab}}}
""")
    return path


def glosses(path: Path, lines: int, copies: int = 1) -> Path:
    text = (WORDNET / "pretrain.txt").read_text().splitlines()[:lines]
    path.write_text("\n".join(text * copies) + "\n")
    return path


TORCHRUN_NOISE = ("Traceback", "ChildFailedError", "SignalException", "torch/distributed")


@pytest.mark.e2e
def test_a_stage_exiting_2_shows_its_one_line_and_torchruns_report_stays_in_the_logs(
        tmp_path: Path, hf_env: dict[str, str]) -> None:
    """The stage finds what validate cannot (a JSON array file without the text field: validate reads only JSON
    lines), writes error.json and exits 2; torchrun reports that as a failed child with a traceback, which goes
    to the attempt's torchrun.log, not to the terminal."""
    (tmp_path / "rows.json").write_text(json.dumps([{"body": f"gloss {n}"} for n in range(50)]))
    run_dir = tmp_path / "run"
    proc = baton("run", tokenizer_manifest(tmp_path, "rows.json"), "--run-dir", run_dir, env=hf_env, check=False)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 2, terminal
    attempt = run_dir / "stages" / "tok" / "logs" / "attempt-1"
    assert (f"== tok: bad input: data.text_field: column 'text' not in ['{tmp_path / 'rows.json'}'] "
            f"(columns: ['body']); logs in {attempt} (") in proc.stdout, terminal
    assert not [noise for noise in TORCHRUN_NOISE if noise in terminal], terminal
    assert proc.stderr == "", proc.stderr
    assert "ChildFailedError" in (attempt / "torchrun.log").read_text()
    assert read(run_dir)["stages"]["tok"]["state"] == "failed"


@pytest.mark.e2e
def test_a_crashing_stage_shows_the_end_of_rank_0s_stderr(tmp_path: Path, hf_env: dict[str, str]) -> None:
    """A real crash (exit 1: SentencePiece refuses a vocabulary larger than 30 lines allow) shows the stage's own
    traceback from rank 0's stderr, not torchrun's."""
    manifest = tokenizer_manifest(tmp_path, glosses(tmp_path / "few.txt", 30).name, vocab=5000)
    proc = baton("run", manifest, "--run-dir", tmp_path / "run", env=hf_env, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    head, _, tail = proc.stdout.partition("== tok: the end of rank 0's stderr (")
    assert tail, proc.stdout
    assert tail.splitlines()[0].endswith("/stages/tok/logs/attempt-1/rank-0.stderr):")
    assert "RuntimeError" in tail and "Vocabulary size too high (5000)" in tail
    assert "== tok: failed with exit code 1; rank 0's stderr: " in tail
    assert not [noise for noise in ("ChildFailedError", "torch/distributed") if noise in proc.stdout + proc.stderr]


@pytest.mark.e2e
def test_ctrl_c_during_the_tokenizer_stops_it_with_75_and_a_rerun_starts_it_over(
        tmp_path: Path, hf_env: dict[str, str]) -> None:
    """SentencePiece trains in C++ and keeps no checkpoints: a stop request ends the stage at once with exit 75,
    no final/, no result.json and state preempted; the next `baton run` trains it from the start."""
    manifest = tokenizer_manifest(tmp_path, glosses(tmp_path / "many.txt", 40_000, copies=3).name, vocab=8000)
    run_dir = tmp_path / "run"
    folder = run_dir / "stages" / "tok"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(manifest), "--run-dir", str(run_dir)],
                            env=hf_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while not any(r.get("event") == "start" for r in read_metrics(folder)):  # the stage is up
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    time.sleep(3)  # reading the data and training
    asked = time.monotonic()
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the terminal sends it to the driver
    terminal, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, terminal
    assert "baton: SIGINT: asking the stage" in terminal
    assert "tok: stopped on a signal after" in terminal and "nothing saved, exit 75" in terminal
    assert "== tok: stopped on the signal before it had anything to keep; running it again starts it over" in terminal
    assert not [noise for noise in TORCHRUN_NOISE if noise in terminal], terminal
    assert time.monotonic() - asked < 60  # not after training to the end
    entry = read(run_dir)["stages"]["tok"]
    assert entry["state"] == "preempted" and [a["outcome"] for a in entry["attempts"]] == ["preempted"]
    assert not (folder / "final").exists() and not (folder / "result.json").exists()
    assert read_metrics(folder)[-1]["event"] == "stop"

    # the next run trains it from the start (a fresh tokenizer stage's training: every pipeline test's)
    plan = baton("run", manifest, "--run-dir", run_dir, "--dry-run", env=hf_env).stdout
    assert "1. tok [tokenizer] RERUN: preempted; no complete checkpoint, starting over" in plan, plan


@pytest.mark.parametrize("keep, left", [("all", ["LATEST", "step00000002", "step00000004", "zero_to_fp32.py"]),
                                        ("last", ["LATEST", "step00000004", "zero_to_fp32.py"]), ("none", None)])
def test_a_done_stage_keeps_the_checkpoints_the_manifest_asks_for(tmp_path: Path, backend: FakeBackend, keep: str,
                                                                   left: list[str] | None) -> None:
    """checkpoint.keep_when_done: once the stage is done and recorded, ckpt/ keeps all, the last or nothing;
    final/ stays, and so does the fingerprint (what is trained does not change): no stage reruns without it."""
    def act(spec: Spec, log_dir: Path) -> int:
        for step in (2, 4):  # two complete checkpoints, as keep_last 2 leaves them
            (Path(spec.stage_dir) / "ckpt" / f"step{step:08d}").mkdir(parents=True)
            (Path(spec.stage_dir) / "ckpt" / f"step{step:08d}" / "COMPLETE").write_text("{}")
        (Path(spec.stage_dir) / "ckpt" / "LATEST").write_text("step00000004\n")
        (Path(spec.stage_dir) / "ckpt" / "zero_to_fp32.py").write_text("# DeepSpeed's\n")
        return play_stage(spec, log_dir)

    backend.act = act
    manifest = write_manifest(tmp_path)
    plain = manifest.read_text()
    manifest.write_text(plain.replace("on_world_size_change: restart",
                                      f"on_world_size_change: restart, keep_when_done: {keep}"))
    assert run("run", manifest, "--run-dir", tmp_path / "run") == 0
    ckpt = stage_dir(tmp_path / "run", "pre") / "ckpt"
    assert (sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else None) == left
    assert (stage_dir(tmp_path / "run", "pre") / "final" / "model.safetensors").is_file()
    manifest.write_text(plain)
    assert run("run", manifest, "--run-dir", tmp_path / "run") == 0
    assert [len(e["attempts"]) for e in launcher.ledger.read(tmp_path / "run")["stages"].values()] == [1, 1, 1]
