"""The ledger (atomic writes, one driver per run folder) and the plan (skip, resume, rerun downstream).

No torch: the plan is computed from a real manifest (tokenizer -> mlm -> classify on a
few lines of data) and ledgers crafted the way the driver writes them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from contract.files import content_matches, dir_digest, file_checksum, file_digest
from contract.layout import stage_dir
from launcher.digests import folder_stat
from launcher.errors import ConfigError, LedgerError
from launcher.ledger import LEDGER, LOCK, Ledger, read
from launcher.manifest import load
from launcher.plan import Step, make_plan
from launcher.resolve import Resolved, build_spec, resolve, settings

# ----------------------------------------------------------------- ledger


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    """A reader polling the ledger while it is rewritten always finds complete JSON."""
    seen: list[int] = []
    broken: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                text = (tmp_path / LEDGER).read_text()
            except FileNotFoundError:
                continue
            try:
                seen.append(len(json.loads(text)["stages"]))
            except json.JSONDecodeError:
                broken.append(text[:80])

    with Ledger(tmp_path) as led:
        led.save()
        reader = threading.Thread(target=poll)
        reader.start()
        try:
            for n in range(150):
                # sizes vary, so an in-place rewrite would show truncated or mixed text
                led.stage(f"stage{n}")["notes"] = "x" * (n % 7) * 2000
                led.save()
        finally:
            stop.set()
            reader.join()
    assert broken == []
    assert seen, "the reader never saw the ledger"
    assert len(read(tmp_path)["stages"]) == 150
    # no temp file, and the lock is gone; the generation before the last save is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, f"{LEDGER}.1"]


def test_checkpoint_checksums_find_a_changed_byte_and_older_sha256_records_still_check(tmp_path: Path) -> None:
    import zlib

    path = tmp_path / "optim.pt"
    data = bytes(range(256)) * 10_000  # 2.5 MB: several read chunks
    path.write_bytes(data)
    checksum, digest = file_checksum(path), file_digest(path)
    assert checksum == f"crc32:{zlib.crc32(data):08x}"
    assert content_matches(path, checksum) and content_matches(path, digest)
    path.write_bytes(data[:1_000_000] + b"\x00" + data[1_000_001:])  # one byte overwritten in place
    assert not content_matches(path, checksum) and not content_matches(path, digest)


def test_read_without_ledger_is_an_empty_run(tmp_path: Path) -> None:
    assert read(tmp_path) == {"version": 1, "stages": {}}
    assert not (tmp_path / LEDGER).exists()


@pytest.mark.parametrize(("text", "says"), [("{not json", "unreadable"), ('{"version": 9, "stages": {}}', "version 9")])
def test_unreadable_ledger_is_refused(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / LEDGER).write_text(text)
    with pytest.raises(LedgerError, match=says):
        read(tmp_path)
    with pytest.raises(LedgerError, match=says), Ledger(tmp_path):
        pass


def test_unreadable_ledger_does_not_keep_the_run_locked(tmp_path: Path) -> None:
    (tmp_path / LEDGER).write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"), Ledger(tmp_path):
        pass
    (tmp_path / LEDGER).write_text('{"version": 1, "stages": {}}')  # the user repairs it
    with Ledger(tmp_path) as led:
        led.save()


def test_second_driver_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with Ledger(tmp_path):
        holder = (tmp_path / LOCK).read_text()
        with pytest.raises(LedgerError) as refused, Ledger(tmp_path):
            pass
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(refused.value)
        assert (tmp_path / LOCK).read_text() == holder  # the refused driver left the lock alone


def test_lock_is_released_on_exit_and_on_error(tmp_path: Path) -> None:
    with Ledger(tmp_path):
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()
    with pytest.raises(RuntimeError), Ledger(tmp_path):
        raise RuntimeError("stage failed")
    assert not (tmp_path / LOCK).exists()
    with Ledger(tmp_path) as led:  # and the next driver gets in
        led.save()


HOLD = """
import sys
from pathlib import Path
from launcher.ledger import Ledger
with Ledger(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_lock_of_a_live_driver_holds_and_of_a_dead_one_is_taken_over(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(LedgerError, match=f"pid {other.pid} "), Ledger(tmp_path):
            pass
    finally:
        other.kill()  # dies without releasing: the lock file stays behind
        other.wait()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == other.pid
    with Ledger(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_of_a_dead_pid_on_another_host_is_not_taken(tmp_path: Path) -> None:
    """The pid means nothing here: that host's driver may be alive."""
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead_pid(), "host": "node-elsewhere", "since": "then"}))
    with pytest.raises(LedgerError, match="node-elsewhere"), Ledger(tmp_path):
        pass


def test_torn_lock_is_taken_over_only_once_stale(tmp_path: Path) -> None:
    """An empty lock file: its creator died before writing it, or is writing it right now."""
    (tmp_path / LOCK).write_text("")
    with pytest.raises(LedgerError), Ledger(tmp_path):
        pass
    old = time.time() - 60
    os.utime(tmp_path / LOCK, (old, old))
    with Ledger(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------- plan

MANIFEST = """\
version: 1
run: {{name: plan}}
defaults:
  launcher: {{nproc_per_node: {nproc}}}
  checkpoint: {{on_world_size_change: {on_change}}}
stages:
  - name: tok
    kind: tokenizer
    data: {{train: {data}/glosses.txt}}
    sentencepiece: {{vocab_size: 100}}
  - name: pre
    kind: mlm
    init:
      config: {{model_type: bert, hidden_size: 32, num_attention_heads: 2}}
    tokenizer: {{from: tok}}
    data: {{train: {data}/glosses.txt}}
    train: {{max_steps: {pre_steps}, micro_batch_size: 4}}
  - name: cls
    kind: classify
    init: {{from: pre}}
    data: {{train: {data}/labelled.jsonl}}
    train: {{epochs: 1, micro_batch_size: 4, lr: {cls_lr}}}
"""

GLOSSES = "a small informal restaurant; serves wine\nvery much\na concluding action\nsummon to enter\n"
LABELLED = ('{"text": "meat from an American bison", "label": "food"}\n'
            '{"text": "a genus of Mustelidae", "label": "animal"}\n')


def write_manifest(folder: Path, *, data: str = "data", pre_steps: int = 10, cls_lr: float = 3e-4, nproc: int = 2,
                   on_change: str = "restart") -> Path:
    """The manifest (data files are written once, unless already there)."""
    (folder / data).mkdir(parents=True, exist_ok=True)
    for name, text in (("glosses.txt", GLOSSES), ("labelled.jsonl", LABELLED)):
        if not (folder / data / name).exists():
            (folder / data / name).write_text(text)
    path = folder / "plan.yaml"
    path.write_text(MANIFEST.format(data=data, pre_steps=pre_steps, cls_lr=cls_lr, nproc=nproc, on_change=on_change))
    return path


def stages_of(manifest: Path) -> list[Resolved]:
    return resolve(load(manifest))


def finish(stages: list[Resolved], run_dir: Path, ledger: dict[str, Any] | None = None,
           names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Record `names` (default: all) as done, the way the driver does, and write their result.json."""
    ledger = ledger or {"version": 1, "stages": {}}
    outputs = {n: e["output"] for n, e in ledger["stages"].items() if e.get("state") == "done"}
    for r in stages:
        if names is not None and r.name not in names:
            continue
        spec = build_spec(r, run_dir, outputs)
        assert spec is not None, f"test bug: {r.name} finished before its inputs"
        folder = stage_dir(run_dir, r.name)
        (folder / "final").mkdir(parents=True, exist_ok=True)
        (folder / "final" / "model.safetensors").write_text(f"{r.name} weights")
        output = {"path": str(folder / "final"), "digest": dir_digest(folder / "final"),
                  "stat": folder_stat(folder / "final")}
        (folder / "result.json").write_text(json.dumps(
            {"status": "done", "stage": r.name, "fingerprint": spec.fingerprint, "output": output}))
        ledger["stages"][r.name] = {"state": "done", "fingerprint": spec.fingerprint, "settings": settings(spec),
                                    "output": output, "attempts": []}
        outputs[r.name] = output
    return ledger


def actions(steps: list[Step]) -> dict[str, str]:
    return {s.stage.name: s.action for s in steps}


def reasons(steps: list[Step]) -> dict[str, str]:
    return {s.stage.name: s.reason for s in steps}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def test_fresh_run_runs_everything(tmp_path: Path, run_dir: Path) -> None:
    steps = make_plan(stages_of(write_manifest(tmp_path)), {"stages": {}}, run_dir)
    assert actions(steps) == {"tok": "run", "pre": "run", "cls": "run"}
    assert steps[0].spec is not None and steps[1].spec is None  # pre's input digest is known only after tok


def test_everything_done_is_skipped(tmp_path: Path, run_dir: Path) -> None:
    stages = stages_of(write_manifest(tmp_path))
    steps = make_plan(stages, finish(stages, run_dir), run_dir)
    assert actions(steps) == {"tok": "skip", "pre": "skip", "cls": "skip"}


def test_done_without_result_file_is_not_skipped(tmp_path: Path, run_dir: Path) -> None:
    stages = stages_of(write_manifest(tmp_path))
    ledger = finish(stages, run_dir)
    (stage_dir(run_dir, "cls") / "result.json").unlink()
    assert actions(make_plan(stages, ledger, run_dir)) == {"tok": "skip", "pre": "skip", "cls": "rerun"}


def test_changed_classify_lr_reruns_only_classify(tmp_path: Path, run_dir: Path) -> None:
    ledger = finish(stages_of(write_manifest(tmp_path, cls_lr=3e-4)), run_dir)
    steps = make_plan(stages_of(write_manifest(tmp_path, cls_lr=5e-4)), ledger, run_dir)
    assert actions(steps) == {"tok": "skip", "pre": "skip", "cls": "rerun"}
    assert "train.lr 0.0003 -> 0.0005" in reasons(steps)["cls"]


def test_changed_mlm_reruns_it_and_everything_downstream(tmp_path: Path, run_dir: Path) -> None:
    ledger = finish(stages_of(write_manifest(tmp_path, pre_steps=10)), run_dir)
    steps = make_plan(stages_of(write_manifest(tmp_path, pre_steps=20)), ledger, run_dir)
    assert actions(steps) == {"tok": "skip", "pre": "rerun", "cls": "rerun"}
    assert "train.max_steps 10 -> 20" in reasons(steps)["pre"]
    assert "pre" in reasons(steps)["cls"]
    assert steps[2].spec is None  # its input is pre's new output, unknown until pre finishes


def interrupt(stages: list[Resolved], run_dir: Path, state: str) -> tuple[dict[str, Any], str]:
    """tok done, pre stopped in `state` (its ledger entry written as the driver does); returns pre's fingerprint."""
    ledger = finish(stages, run_dir, names=("tok",))
    spec = build_spec(stages[1], run_dir, {"tok": ledger["stages"]["tok"]["output"]})
    assert spec is not None
    ledger["stages"]["pre"] = {"state": state, "fingerprint": spec.fingerprint, "settings": settings(spec),
                               "output": None, "attempts": [{"attempt": 1, "exit_code": 75}]}
    return ledger, spec.fingerprint


def write_checkpoint(run_dir: Path, tag: str, fingerprint: str | None, latest: bool = True,
                     **marker: Any) -> None:
    """ckpt/<tag>/COMPLETE (None: the folder without it) and ckpt/LATEST, per docs/stage-contract.md."""
    ckpt = stage_dir(run_dir, "pre") / "ckpt"
    (ckpt / tag).mkdir(parents=True)
    if fingerprint is not None:
        (ckpt / tag / "COMPLETE").write_text(json.dumps(
            {"step": int(tag.removeprefix("step")), "samples": 1600, "fingerprint": fingerprint, "time": 0}
            | marker))
    if latest:
        (ckpt / "LATEST").write_text(tag + "\n")


@pytest.mark.parametrize("state", ["running", "preempted"])
def test_interrupted_stage_with_complete_checkpoint_resumes(tmp_path: Path, run_dir: Path, state: str) -> None:
    stages = stages_of(write_manifest(tmp_path))
    ledger, fp = interrupt(stages, run_dir, state)
    write_checkpoint(run_dir, "step00000100", fp)
    write_checkpoint(run_dir, "step00000200", fp)
    steps = make_plan(stages, ledger, run_dir)
    assert actions(steps) == {"tok": "skip", "pre": "resume", "cls": "run"}
    assert steps[1].resume_tag == "step00000200"
    assert "step00000200" in steps[1].reason


@pytest.mark.parametrize("broken", ["other-fingerprint", "no-COMPLETE"])
def test_incomplete_or_foreign_checkpoint_is_not_resumed(tmp_path: Path, run_dir: Path, broken: str) -> None:
    stages = stages_of(write_manifest(tmp_path))
    ledger, fp = interrupt(stages, run_dir, "preempted")
    marker = {"other-fingerprint": "sha256:" + "0" * 64, "no-COMPLETE": None}[broken]
    write_checkpoint(run_dir, "step00000200", marker)
    steps = make_plan(stages, ledger, run_dir)
    assert actions(steps)["pre"] == "rerun"
    assert steps[1].resume_tag is None


def test_a_complete_checkpoint_newer_than_latest_is_the_one_resumed(tmp_path: Path, run_dir: Path) -> None:
    """Killed between COMPLETE and LATEST: the plan, like the stage, resumes from the newer complete one."""
    stages = stages_of(write_manifest(tmp_path))
    ledger, fp = interrupt(stages, run_dir, "running")
    write_checkpoint(run_dir, "step00000100", fp)
    write_checkpoint(run_dir, "step00000200", fp, latest=False)
    write_checkpoint(run_dir, "step00000300", None, latest=False)  # a folder the kill left half-written
    steps = make_plan(stages, ledger, run_dir)
    assert actions(steps)["pre"] == "resume" and steps[1].resume_tag == "step00000200"


@pytest.mark.parametrize("on_change", ["restart", "resume"])
def test_a_changed_world_size_reruns_unless_the_manifest_says_resume(tmp_path: Path, run_dir: Path,
                                                                      on_change: str) -> None:
    """pre stopped at world size 2; the manifest now says 1. By default the stage starts over; with
    checkpoint.on_world_size_change: resume its checkpoint is resumed (the stage converts it) and the done
    tokenizer stage, one process whatever the world size, is kept either way."""
    stages = stages_of(write_manifest(tmp_path, on_change=on_change))
    ledger, _ = interrupt(stages, run_dir, "preempted")
    spec = build_spec(stages[1], run_dir, {"tok": ledger["stages"]["tok"]["output"]})
    assert spec is not None
    write_checkpoint(run_dir, "step00000200", spec.fingerprint, fingerprint_any_world=spec.fingerprint_any_world,
                     world_size=2)
    steps = make_plan(stages_of(write_manifest(tmp_path, nproc=1, on_change=on_change)), ledger, run_dir)
    if on_change == "restart":
        assert actions(steps) == {"tok": "skip", "pre": "rerun", "cls": "run"}
        assert "world_size 2 -> 1" in reasons(steps)["pre"] and steps[1].resume_tag is None
    else:
        assert actions(steps) == {"tok": "skip", "pre": "resume", "cls": "run"}
        assert steps[1].resume_tag == "step00000200"
        assert reasons(steps)["pre"] == "preempted; resume from step00000200, saved at world size 2"


def test_resume_at_another_world_size_keeps_done_stages_but_not_other_changes(tmp_path: Path,
                                                                              run_dir: Path) -> None:
    stages = stages_of(write_manifest(tmp_path, on_change="resume"))
    ledger = finish(stages, run_dir)
    steps = make_plan(stages_of(write_manifest(tmp_path, nproc=1, on_change="resume")), ledger, run_dir)
    assert actions(steps) == {"tok": "skip", "pre": "skip", "cls": "skip"}
    assert reasons(steps)["pre"] == "done at world size 2; kept at 1 (checkpoint.on_world_size_change: resume)"
    steps = make_plan(stages_of(write_manifest(tmp_path, nproc=1, on_change="resume", cls_lr=5e-4)), ledger, run_dir)
    assert actions(steps) == {"tok": "skip", "pre": "skip", "cls": "rerun"}
    assert "train.lr 0.0003 -> 0.0005" in reasons(steps)["cls"]


def test_only_a_stage_whose_input_never_ran_is_refused(tmp_path: Path, run_dir: Path) -> None:
    stages = stages_of(write_manifest(tmp_path))
    ledger = finish(stages, run_dir, names=("tok",))
    with pytest.raises(ConfigError, match="stage cls needs the output of pre"):
        make_plan(stages, ledger, run_dir, only="cls")


def test_only_runs_that_stage_and_not_its_dependents(tmp_path: Path, run_dir: Path) -> None:
    ledger = finish(stages_of(write_manifest(tmp_path, pre_steps=10)), run_dir)
    steps = make_plan(stages_of(write_manifest(tmp_path, pre_steps=20)), ledger, run_dir, only="pre")
    assert actions(steps) == {"tok": "skip", "pre": "rerun", "cls": "skip"}
    assert reasons(steps)["cls"] == "not selected"


def test_from_selects_that_stage_and_the_later_ones(tmp_path: Path, run_dir: Path) -> None:
    stages = stages_of(write_manifest(tmp_path))
    ledger = finish(stages, run_dir, names=("tok",))
    steps = make_plan(stages, ledger, run_dir, start="pre")
    assert actions(steps) == {"tok": "skip", "pre": "run", "cls": "run"}
    assert reasons(steps)["tok"] == "not selected"
    with pytest.raises(ConfigError, match="needs the output of pre"):
        make_plan(stages, ledger, run_dir, start="cls")


@pytest.mark.parametrize("flag", ["only", "start"])
def test_unknown_stage_in_only_or_from_lists_the_stages(tmp_path: Path, run_dir: Path, flag: str) -> None:
    stages = stages_of(write_manifest(tmp_path))
    with pytest.raises(ConfigError, match="no such stage; stages: tok, pre, cls"):
        make_plan(stages, {"stages": {}}, run_dir, **{flag: "finetune"})


def fingerprints(manifest: Path, run_dir: Path) -> dict[str, str]:
    """Every stage's fingerprint, its upstream stages finished with fixed output digests."""
    outputs = {name: {"path": str(stage_dir(run_dir, name) / "final"), "digest": f"sha256:{name}"}
               for name in ("tok", "pre")}
    specs = {r.name: build_spec(r, run_dir, outputs) for r in stages_of(manifest)}
    return {name: spec.fingerprint for name, spec in specs.items() if spec is not None}


def test_fingerprint_follows_data_bytes_not_paths(tmp_path: Path) -> None:
    before = fingerprints(write_manifest(tmp_path / "a"), tmp_path / "a" / "run")
    assert len(set(before.values())) == 3

    # the same bytes elsewhere (data folder, manifest folder, run folder) change nothing
    shutil.copytree(tmp_path / "a" / "data", tmp_path / "b" / "moved")
    assert fingerprints(write_manifest(tmp_path / "b", data="moved"), tmp_path / "b" / "run") == before

    # one changed byte in the classifier's data changes the classifier alone
    labelled = tmp_path / "a" / "data" / "labelled.jsonl"
    labelled.write_text(labelled.read_text().replace("bison", "bisor"))
    after = fingerprints(tmp_path / "a" / "plan.yaml", tmp_path / "a" / "run")
    assert after["cls"] != before["cls"]
    assert {k: after[k] for k in ("tok", "pre")} == {k: before[k] for k in ("tok", "pre")}


def test_fingerprint_follows_upstream_output_digest(tmp_path: Path, run_dir: Path) -> None:
    stages = stages_of(write_manifest(tmp_path))
    a = build_spec(stages[2], run_dir, {"pre": {"path": "/x/final", "digest": "sha256:one"}})
    b = build_spec(stages[2], run_dir, {"pre": {"path": "/y/final", "digest": "sha256:one"}})
    c = build_spec(stages[2], run_dir, {"pre": {"path": "/x/final", "digest": "sha256:two"}})
    assert a is not None and b is not None and c is not None
    assert a.fingerprint == b.fingerprint != c.fingerprint
