"""Kill a training stage mid-run (SIGKILL: a crashed machine) or stop it (SIGTERM: Ctrl-C, preemption),
run `baton run` again, and check it resumes from the newest complete checkpoint and ends with
exactly the weights of a run that was never interrupted. ZeRO 1, 2 and 3, 2 processes, gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, TINY_BERT, baton

pytestmark = pytest.mark.slow
STEPS = 30


def mlm_manifest(tokenizer: Path, zero: str) -> str:
    return f"""version: 1
run: {{name: resume-{zero}}}
defaults:
  launcher: {{nproc_per_node: 2}}
  deepspeed: {{config: {zero}}}
  seed: 11
stages:
  - name: pretrain
    kind: mlm
    init:
{TINY_BERT}
    tokenizer: {{pretrained: {tokenizer}}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: {STEPS}, micro_batch_size: 8, grad_accum: 2, lr: 1.0e-3, warmup_steps: 5, schedule: cosine}}
    checkpoint: {{every_steps: 5, keep_last: 2}}
    eval: {{at_end: false}}
"""


def start(manifest: Path, run_dir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(manifest), "--run-dir", str(run_dir)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen[str], min_step: int, timeout: float = 240) -> int:
    latest = run_dir / "stages" / "pretrain" / "ckpt" / "LATEST"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"stage ended before it could be interrupted:\n{proc.stdout.read()}"
        if latest.exists():
            tag = latest.read_text().strip()
            step = json.loads((latest.parent / tag / "COMPLETE").read_text())["step"]
            if step >= min_step:
                return step
        time.sleep(0.2)
    raise AssertionError("no complete checkpoint appeared")


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "stages" / "pretrain" / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ (bitwise) in {different[:5]}"


@pytest.fixture(scope="module")
def setup(tiny_run: dict[str, Path]):
    """Write a one-stage manifest (and a link to the shared data) into a folder; return its path."""
    tokenizer = tiny_run["run_dir"] / "stages" / "tokenizer" / "final"

    def write(folder: Path, zero: str) -> Path:
        (folder / "data").symlink_to(tiny_run["root"] / "data")
        manifest = folder / "m.yaml"
        manifest.write_text(mlm_manifest(tokenizer, zero))
        return manifest
    return write


@pytest.fixture(scope="module")
def straight(setup, hf_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """Final weights of an uninterrupted run, per ZeRO stage (trained once per module)."""
    cache: dict[str, dict] = {}

    def get(zero: str) -> dict:
        if zero not in cache:
            folder = tmp_path_factory.mktemp(f"straight-{zero}")
            baton("run", setup(folder, zero), "--run-dir", folder / "run", env=hf_env)
            cache[zero] = final_weights(folder / "run")
        return cache[zero]
    return get


@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
def test_sigkill_then_rerun_resumes_to_the_same_weights(zero: str, setup, straight, hf_env: dict[str, str],
                                                        tmp_path: Path) -> None:
    manifest = setup(tmp_path, zero)
    run_dir = tmp_path / "killed"
    proc = start(manifest, run_dir, hf_env)
    step = wait_for_checkpoint(run_dir, proc, min_step=10)
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in family:  # the driver, torchrun and both ranks die at once, as on a crashed node
        p.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=30)
    led = json.loads((run_dir / "ledger.json").read_text())
    assert led["stages"]["pretrain"]["state"] == "running"
    assert step < STEPS

    out = baton("run", manifest, "--run-dir", run_dir, env=hf_env).stdout
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"]["pretrain"]
    assert entry["state"] == "done" and len(entry["attempts"]) == 2
    resumed = entry["attempts"][1]["resumed_from"]
    assert resumed is not None and int(resumed.removeprefix("step")) >= step, out
    assert_same_weights(straight(zero), final_weights(run_dir))


def test_sigterm_checkpoints_exits_75_and_resumes(setup, straight, hf_env: dict[str, str], tmp_path: Path) -> None:
    manifest = setup(tmp_path, "zero2")
    run_dir = tmp_path / "stopped"
    proc = start(manifest, run_dir, hf_env)
    wait_for_checkpoint(run_dir, proc, min_step=5)
    os.kill(proc.pid, signal.SIGTERM)  # as Ctrl-C or a scheduler would
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"]["pretrain"]
    assert entry["state"] == "preempted" and entry["attempts"][0]["outcome"] == "preempted"
    records = [json.loads(line) for line in (run_dir / "stages/pretrain/metrics.jsonl").read_text().splitlines()]
    stop = [r for r in records if r["event"] == "stop"]
    assert stop and stop[0]["step"] < STEPS

    baton("run", manifest, "--run-dir", run_dir, env=hf_env)
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"]["pretrain"]
    assert entry["state"] == "done" and entry["attempts"][1]["resumed_from"] == f"step{stop[0]['step']:08d}"
    assert_same_weights(straight("zero2"), final_weights(run_dir))
