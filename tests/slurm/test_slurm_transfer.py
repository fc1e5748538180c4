"""A distill stage with a transfer set under Slurm, as every stage: submitted after its teacher, requeued while it
trains, it resumes from its checkpoint and ends with the weights of an uninterrupted local run of the same manifest
(the micro-batches it draws from the labelled rows and from the transfer set depend on the step alone)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_BERT, baton, write_data
from tests.slurm.helpers import (
    SLURM_DEFAULTS,
    assert_same_weights,
    describe,
    final_weights,
    submit,
    wait_for_checkpoint,
    wait_states,
)

# A requeue resuming bitwise is proven by test_slurm.py, a transfer stage resuming by tests/stages/test_transfer.py
pytestmark = [pytest.mark.slurm, pytest.mark.full]
STEPS, CKPT = 60, 10

MANIFEST = f"""version: 1
run: {{name: slurm-transfer}}
defaults:
  launcher: {{nproc_per_node: 2}}
  deepspeed: {{config: zero2}}
  seed: 5
{SLURM_DEFAULTS}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: data/pretrain.txt}}
    sentencepiece: {{vocab_size: 600}}
  - name: teacher
    kind: classify
    init:
{TINY_BERT}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/train.jsonl, eval: data/eval.jsonl, max_length: 32}}
    train: {{max_steps: 20, micro_batch_size: 8, lr: 1.0e-3}}
  - name: student
    kind: distill
    init: {{from: teacher}}
    teacher: {{from: teacher}}
    data: {{train: data/train.jsonl, eval: data/eval.jsonl, max_length: 32}}
    transfer: {{train: data/pretrain.txt, max_length: 32}}
    distill: {{task: classify, alpha: 0.5, temperature: 2.0, keep_layers: [1], transfer_share: 0.5}}
    train: {{max_steps: {STEPS}, micro_batch_size: 8, lr: 1.0e-3, log_every: 10}}
    checkpoint: {{every_steps: {CKPT}, keep_last: 2}}
"""


def test_a_requeued_transfer_stage_resumes_to_the_weights_of_a_local_run(slurm_cluster: dict, tmp_path: Path,
                                                                           hf_env: dict[str, str]) -> None:
    write_data(tmp_path / "data")
    manifest = tmp_path / "transfer.yaml"
    manifest.write_text(MANIFEST)
    local = tmp_path / "local"
    baton("run", manifest, "--run-dir", local, env=hf_env, timeout=1200)

    env = slurm_cluster["env"]
    run_dir = tmp_path / "slurm"
    jobs = submit(manifest, run_dir, env, cwd=tmp_path)
    step = wait_for_checkpoint(run_dir, "student", env, min_step=CKPT, timeout=600)
    subprocess.run(["scontrol", "requeue", jobs["student"]], env=env, check=True)
    entry = wait_states(run_dir, env, {"student": {"done", "failed"}}, timeout=600)["student"]
    story = describe(run_dir, env)
    assert entry["state"] == "done", story
    last = entry["attempts"][-1]
    assert last["restart"] == 1 and int(last["resumed_from"].removeprefix("step")) >= step, story
    assert_same_weights(final_weights(local, "student"), final_weights(run_dir, "student"))
