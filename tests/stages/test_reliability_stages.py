"""What a stage does with damaged state instead of training on it silently: a checkpoint whose files
differ from what COMPLETE recorded is passed over for the previous intact one, no intact one stops the
stage with exit 2, and a loss that stays NaN stops it with exit 2 and nothing exported."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.stages import specs

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 4
MANIFEST = f"""version: 1
run: {{name: reliability}}
defaults:
  launcher: {{nproc_per_node: 2}}
  deepspeed: {{config: zero2}}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: data/pretrain.txt}}
    sentencepiece: {{vocab_size: 600}}
  - name: mlm
    kind: mlm
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: {STEPS}, micro_batch_size: 8, lr: 1.0e-3, log_every: 1}}
    checkpoint: {{every_steps: {EVERY}, keep_last: 2}}
    eval: {{at_end: false}}
  - name: diverge
    kind: mlm
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: 20, micro_batch_size: 4, lr: 1.0e+30, log_every: 1}}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reliability")
    specs.copy_data(root / "data")
    stages = specs.Stages(root, MANIFEST, root / "hf")
    stages.run("tokenizer")
    return {"root": root, "stages": stages}


def _rerun(work: dict, name: str) -> subprocess.CompletedProcess:
    return work["stages"].launch(work["stages"].spec(name))


def _damage(path: Path, *, truncate: bool = False) -> None:
    data = bytearray(path.read_bytes())
    if truncate:
        path.write_bytes(data[: len(data) // 2])
        return
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # 4 KB overwritten, same size
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_falls_back_to_the_previous_intact_one(work):
    from safetensors.torch import load_file

    stages = work["stages"]
    folder = stages.folder("mlm")
    reference = stages.run("mlm")
    want = load_file(str(folder / "final" / "model.safetensors"))
    assert sorted(p.name for p in (folder / "ckpt").glob("step*")) == ["step00000004", "step00000008"]
    complete = json.loads((folder / "ckpt" / "step00000008" / "COMPLETE").read_text())
    optim = sorted(n for n in complete["files"] if "optim_states" in n)
    assert optim and all(set(r) == {"size", "digest"} for r in complete["files"].values())

    # the newest checkpoint's optimizer state damaged in place; the stage must not be done yet to resume
    _damage(folder / "ckpt" / "step00000008" / optim[0])
    shutil.rmtree(folder / "final")
    (folder / "result.json").unlink()
    proc = _rerun(work, "mlm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint step00000008 is damaged ({optim[0]}: content differs" in proc.stdout, proc.stdout[-3000:]
    assert "resuming from step00000004" in proc.stdout
    starts = specs.records(folder, "start")
    assert [s["step"] for s in starts] == [0, 4]
    got = load_file(str(folder / "final" / "model.safetensors"))
    import torch

    assert all(torch.equal(got[k], want[k]) for k in want)  # as if the damaged checkpoint had never been
    assert json.loads((folder / "result.json").read_text())["steps"] == reference["steps"]

    # a file cut short in the newest one and the older one damaged: nothing to resume from, exit 2
    _damage(folder / "ckpt" / "step00000008" / "rng-rank1.pt", truncate=True)
    _damage(folder / "ckpt" / "step00000004" / optim[0])
    shutil.rmtree(folder / "final")
    (folder / "result.json").unlink()
    proc = _rerun(work, "mlm")
    assert proc.returncode != 0
    error = json.loads((folder / "error.json").read_text())
    assert error["exit_code"] == 2 and "no intact checkpoint" in error["message"], error
    assert "rng-rank1.pt:" in error["message"] and "bytes" in error["message"]
    assert not (folder / "final").exists() and not (folder / "final.tmp").exists()


def test_a_loss_that_stays_nan_stops_the_stage_and_exports_nothing(work):
    stages = work["stages"]
    folder = stages.folder("diverge")
    proc = _rerun(work, "diverge")  # lr 1e30: the first update sends the weights to 1e30, the forward overflows
    assert proc.returncode != 0
    error = json.loads((folder / "error.json").read_text())
    assert error["exit_code"] == 2 and "NaN or infinite for 3 consecutive steps" in error["message"], error
    assert not (folder / "final").exists() and not (folder / "result.json").exists()
    # metrics.jsonl stays strict JSON: the NaN losses are recorded as null
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert losses[-3:] == [None, None, None] and len(losses) < 20, losses
    assert records[-1]["event"] == "stop" and records[-1]["reason"] == "non-finite loss"


def test_final_never_holds_a_non_finite_tensor(work, tmp_path):
    import torch

    from stages.runtime import export
    from stages.runtime.spec import Diverged

    spec = work["stages"].spec("mlm").model_copy(update={"stage_dir": str(tmp_path)})
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(Diverged, match="weight"):
        export.save_final(model, None, spec, zero_stage=1)
    assert list(tmp_path.iterdir()) == []
