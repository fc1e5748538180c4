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

pytestmark = pytest.mark.e2e
STEPS = 40


def mlm_manifest(tokenizer: Path, zero: str, nproc: int = 2, grad_accum: int = 2, init: str = TINY_BERT) -> str:
    return f"""version: 1
run: {{name: resume-{zero}}}
defaults:
  launcher: {{nproc_per_node: {nproc}}}
  deepspeed: {{config: {zero}}}
  seed: 11
stages:
  - name: pretrain
    kind: mlm
    init:
{init}
    tokenizer: {{pretrained: {tokenizer}}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: {STEPS}, micro_batch_size: 8, grad_accum: {grad_accum}, lr: 1.0e-3, warmup_steps: 5,
             schedule: cosine, weight_decay: 0.01, log_every: 1}}
    checkpoint: {{every_steps: 5, keep_last: 2, on_world_size_change: resume}}
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

    def write(folder: Path, zero: str, **kwargs) -> Path:
        if not (folder / "data").exists():
            (folder / "data").symlink_to(tiny_run["root"] / "data")
        manifest = folder / "m.yaml"
        manifest.write_text(mlm_manifest(tokenizer, zero, **kwargs))
        return manifest
    return write


@pytest.fixture(scope="module")
def straight(setup, hf_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The run folder of an uninterrupted run of `setup`'s manifest, per settings (trained once per module)."""
    cache: dict[str, Path] = {}

    def get(zero: str, **kwargs) -> Path:
        folder = tmp_path_factory.mktemp(f"straight-{zero}")
        manifest = setup(folder, zero, **kwargs)
        if manifest.read_text() not in cache:
            baton("run", manifest, "--run-dir", folder / "run", env=hf_env)
            cache[manifest.read_text()] = folder / "run"
        return cache[manifest.read_text()]
    return get


# The driver's part of a crash (ledger left "running", the rerun resumes) does not depend on the ZeRO stage; the
# stage's part, SIGKILL and a bitwise resume, runs for every kind in tests/stages/ (ZeRO 1, 2 and 3).
def test_stopped_then_killed_each_rerun_resumes_to_the_same_weights(setup, straight, hf_env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    """SIGTERM (Ctrl-C, a scheduler): the stage checkpoints and the run exits 75, preempted. The rerun is then
    SIGKILLed with the driver, torchrun and both ranks at once (a crashed node): the ledger is left "running". The
    next rerun resumes from the newest complete checkpoint and ends bitwise on the uninterrupted run's weights."""
    manifest = setup(tmp_path, "zero3", init=NO_DROPOUT)  # the settings the world-size change starts from
    run_dir = tmp_path / "run"
    proc = start(manifest, run_dir, hf_env)
    wait_for_checkpoint(run_dir, proc, min_step=5)
    os.kill(proc.pid, signal.SIGTERM)  # as Ctrl-C or a scheduler would
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"]["pretrain"]
    assert entry["state"] == "preempted" and entry["attempts"][0]["outcome"] == "preempted"
    records = [json.loads(line) for line in (run_dir / "stages/pretrain/metrics.jsonl").read_text().splitlines()]
    stop = [r["step"] for r in records if r["event"] == "stop"]
    assert stop and stop[0] < STEPS

    proc = start(manifest, run_dir, hf_env)
    step = wait_for_checkpoint(run_dir, proc, min_step=stop[0] + 1)
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in family:  # the driver, torchrun and both ranks die at once, as on a crashed node
        p.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=30)
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"]["pretrain"]
    assert entry["state"] == "running" and entry["attempts"][1]["resumed_from"] == f"step{stop[0]:08d}"
    assert step < STEPS

    out = baton("run", manifest, "--run-dir", run_dir, env=hf_env).stdout
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"]["pretrain"]
    assert entry["state"] == "done" and len(entry["attempts"]) == 3
    resumed = entry["attempts"][2]["resumed_from"]
    assert resumed is not None and int(resumed.removeprefix("step")) >= step, out
    assert_same_weights(final_weights(straight("zero3", init=NO_DROPOUT)), final_weights(run_dir))


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from the stage's metrics.jsonl (the newest record of each step)."""
    lines = (run_dir / "stages" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["event"] == "train"}


# No dropout: a rank's dropout stream cannot follow it to another world size, and without it the
# resumed run must compute what the uninterrupted one did, up to the order of float sums.
NO_DROPOUT = TINY_BERT + "\n        hidden_dropout_prob: 0.0\n        attention_probs_dropout_prob: 0.0"


@pytest.mark.parametrize("zero, sizes", [("zero3", (2, 1, 2)),
                                         pytest.param("zero2", (2, 1), marks=pytest.mark.full),
                                         pytest.param("zero0", (2, 1), marks=pytest.mark.full)])
def test_resume_at_other_world_sizes_continues_the_same_run(zero: str, sizes: tuple[int, ...], setup, straight,
                                                            hf_env: dict[str, str], tmp_path: Path) -> None:
    """2 ranks -> 1 -> 2 with the same global batch (grad_accum makes up for the ranks), stopped before each change:
    the stage resumes through a universal checkpoint at the same sample, its losses go on as an uninterrupted run's,
    and the ledger records each change. (ZeRO 2 from 2 ranks to 1: the adapters' kinds test, and full here.)"""
    import torch

    settings = {n: {"nproc": n, "grad_accum": 4 // n, "init": NO_DROPOUT} for n in sizes}
    uninterrupted = straight(zero, **settings[sizes[0]])

    manifest, run_dir = setup(tmp_path, zero, **settings[sizes[0]]), tmp_path / "run"
    ckpt = run_dir / "stages" / "pretrain" / "ckpt"
    changes, stops = list(zip(sizes, sizes[1:])), []

    def resumed(out: str, change: int) -> None:
        """What the run that made `change` (1, 2 …) said and recorded."""
        (before, after), step = changes[change - 1], stops[change - 1]
        assert f"resume from step{step:08d}, saved at world size {before}" in out, out
        universal = zero != "zero0"  # ZeRO-0 checkpoints hold whole states, which load at any world size
        assert ("converting" in out) == universal, out
        attempt = json.loads((run_dir / "ledger.json").read_text())["stages"]["pretrain"]["attempts"][change]
        assert attempt["world_size"] == after
        assert attempt["world_size_change"] == {"from": before, "to": after, "step": step}

    proc = start(manifest, run_dir, hf_env)
    wait_for_checkpoint(run_dir, proc, min_step=10)
    for change, (before, after) in enumerate(changes, start=1):
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 75, out
        if change > 1:
            resumed(out, change - 1)
        stopped = json.loads((ckpt / (ckpt / "LATEST").read_text().strip() / "COMPLETE").read_text())
        assert stopped["world_size"] == before and stopped["step"] < STEPS
        stops.append(stopped["step"])

        setup(tmp_path, zero, **settings[after])
        if change == 1:
            resume = manifest.read_text()
            manifest.write_text(resume.replace("on_world_size_change: resume", "on_world_size_change: restart"))
            plan = baton("run", manifest, "--run-dir", run_dir, "--dry-run", env=hf_env).stdout
            assert f"RERUN: changed: deepspeed.gradient_accumulation_steps {4 // before} -> {4 // after}" in plan, plan
            manifest.write_text(resume)
        if change < len(changes):  # resumed, and stopped again once it has saved a checkpoint of its own
            proc = start(manifest, run_dir, hf_env)
            wait_for_checkpoint(run_dir, proc, min_step=stopped["step"] + 1)
        else:
            resumed(baton("run", manifest, "--run-dir", run_dir, env=hf_env).stdout, change)
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"]["pretrain"]
    assert entry["state"] == "done" and len(entry["attempts"]) == len(sizes)
    assert not (ckpt / "universal").exists(), "the conversion outlived the next checkpoint"

    want, got = losses(uninterrupted), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    jumps = {s: (want[s], got[s]) for s in range(stops[0] + 1, STEPS + 1)
             if abs(want[s] - got[s]) > 1e-5 * abs(want[s])}
    assert not jumps, f"after the resume the loss differs from the uninterrupted run's (step: want, got): {jumps}"
    a, b = final_weights(uninterrupted), final_weights(run_dir)
    far = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6)}
    assert not far, f"final weights differ beyond float-order noise: {far}"

    other = next(n for n in sizes if n != sizes[-1])  # another world size: the done stage is kept
    setup(tmp_path, zero, **settings[other])
    plan = baton("run", manifest, "--run-dir", run_dir, "--dry-run", env=hf_env).stdout
    assert f"SKIP: done at world size {sizes[-1]}; kept at {other}" in plan, plan
