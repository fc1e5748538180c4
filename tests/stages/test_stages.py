"""Stages run for real: torchrun, 2 gloo ranks, DeepSpeed ZeRO 1/2/3 on a tiny BERT, on CPU.

One module-scoped chain (tokenizer → mlm → classify) feeds every test; each
ZeRO stage of classify gets an uninterrupted reference run and a run that is
SIGKILLed after its first complete checkpoint and then rerun to completion.
(mlm's kill-and-resume runs through the launcher in tests/test_resume.py.)
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.stages import specs

pytestmark = pytest.mark.slow

ZEROS = [1, 2, 3]
STEPS, EVERY = 24, 6


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stages")
    return {"root": root, "files": specs.copy_data(root / "data"), "cache": root / "cache", "hf": root / "hf"}


def _run_ok(spec: dict, work: dict) -> dict:
    result = specs.run_stage(spec, work["hf"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(Path(spec["stage_dir"], "result.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(work) -> dict:
    s = specs.spec(
        "tokenizer", work["root"] / "tokenizer", cache_dir=work["cache"], train_files=[work["files"]["pretrain.txt"]],
        fmt="text", every_ckpt=None,
        options={"vocab_size": 1000, "model_type": "unigram", "character_coverage": 1.0, "max_sentences": 100000,
                 "lowercase": False},
    )
    out = _run_ok(s, work)["output"]
    return {"source": "stage", "stage": "tokenizer", "path": out["path"], "digest": out["digest"]}


def mlm_spec(work, tokenizer, zero: int, name: str) -> dict:
    return specs.spec(
        "mlm", work["root"] / name, cache_dir=work["cache"], train_files=[work["files"]["pretrain.txt"]],
        eval_files=[work["files"]["pretrain.txt"]], fmt="text", tokenizer=tokenizer, zero=zero,
        init={"source": "config", "stage": None, "path": None, "digest": None, "config": specs.TINY_BERT},
        options={"mask_prob": 0.15}, max_steps=STEPS, every_ckpt=EVERY, eval_every=EVERY,
    )


def classify_spec(work, tokenizer, init_final: dict, zero: int, name: str) -> dict:
    return specs.spec(
        "classify", work["root"] / name, cache_dir=work["cache"], train_files=[work["files"]["supersense_train.jsonl"]],
        eval_files=[work["files"]["supersense_eval.jsonl"]], tokenizer=tokenizer, zero=zero, label_field="label",
        init={"source": "stage", "stage": "mlm", "path": init_final["path"], "digest": init_final["digest"],
              "config": None},
        micro=4, accum=2, max_steps=STEPS, every_ckpt=EVERY,
    )


@pytest.fixture(scope="module")
def mlm_ref(work, tokenizer) -> dict:
    result = _run_ok(mlm_spec(work, tokenizer, 1, "mlm-ref-z1"), work)
    assert result["metrics"]["perplexity"] > 1
    return result


@pytest.fixture(scope="module")
def classify_refs(work, tokenizer, mlm_ref) -> dict[int, dict]:
    init = mlm_ref["output"]
    return {z: _run_ok(classify_spec(work, tokenizer, init, z, f"cls-ref-z{z}"), work) for z in ZEROS}


def test_tokenizer_final_loads_with_autotokenizer(tokenizer):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer["path"])
    assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == \
        ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    assert len(tok) == 1000
    sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer["path"], "sentencepiece.model")))
    text = "a reference book containing an alphabetical list of words"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids[1:-1] == sp.encode(text)
    pair = tok(text, "with information")["input_ids"]
    assert pair.count(tok.sep_token_id) == 2


def _safetensors(final: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(final, "model.safetensors")))


def _records(stage_dir: Path, event: str) -> list[dict]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _kill_after_first_checkpoint(spec: dict, work: dict) -> None:
    """Start the stage and SIGKILL torchrun and its workers once a COMPLETE checkpoint exists."""
    stage_dir = Path(spec["stage_dir"])
    proc = subprocess.Popen(specs.command(spec), cwd=specs.REPO, env=specs.env(work["hf"]), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(stage_dir.glob("ckpt/step*/COMPLETE")):
        assert proc.poll() is None, f"stage ended before any checkpoint: {proc.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.01)
    # torchrun starts each rank in a session of its own: kill the tree, not a process group.
    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)
    proc.wait()
    proc.stderr.close()
    assert not (stage_dir / "result.json").exists(), "the kill came too late: the stage had finished"


def _assert_resumed_like(ref: dict, spec: dict, work: dict) -> None:
    stage_dir = Path(spec["stage_dir"])
    _kill_after_first_checkpoint(spec, work)
    result = _run_ok(spec, work)
    start = _records(stage_dir, "start")
    assert len(start) == 2 and start[1]["step"] > 0, start  # the rerun resumed instead of starting over
    complete = sorted(p.parent.name for p in stage_dir.glob("ckpt/step*/COMPLETE"))
    assert len(complete) <= spec["checkpoint"]["keep_last"]
    assert (stage_dir / "ckpt" / "LATEST").read_text().strip() == complete[-1]

    ref_dir = Path(ref["output"]["path"]).parent
    assert result["steps"] == ref["steps"] == STEPS and result["samples"] == ref["samples"]
    # Bitwise: same world size, fp32, deterministic CPU kernels, and every source of randomness
    # (data order, masking, dropout RNG) restored from the checkpoint.
    resumed_losses = {r["step"]: r["loss"] for r in _records(stage_dir, "train")}
    ref_losses = {r["step"]: r["loss"] for r in _records(ref_dir, "train")}
    assert all(resumed_losses[s] == ref_losses[s] for s in resumed_losses)
    assert result["metrics"] == ref["metrics"]
    got, want = _safetensors(result["output"]["path"]), _safetensors(ref["output"]["path"])
    assert got.keys() == want.keys()
    import torch

    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("zero", ZEROS)
def test_classify_killed_and_resumed_equals_uninterrupted(work, tokenizer, mlm_ref, classify_refs, zero):
    ref = classify_refs[zero]
    assert set(ref["metrics"]) == {"eval_loss", "accuracy", "macro_f1"}
    spec = classify_spec(work, tokenizer, mlm_ref["output"], zero, f"cls-kill-z{zero}")
    _assert_resumed_like(ref, spec, work)


@pytest.mark.parametrize("zero", ZEROS)
def test_classify_final_reproduces_eval_predictions(work, classify_refs, zero):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    final = classify_refs[zero]["output"]["path"]
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    rows = [json.loads(line) for line in work["files"]["supersense_eval.jsonl"].read_text().splitlines()]
    preds = [json.loads(line) for line in Path(final).parent.joinpath("eval_predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in preds] == list(range(len(rows)))
    assert all(model.config.id2label[p["label"]] == r["label"] for p, r in zip(preds, rows, strict=True))
    with torch.no_grad():
        logits = model(**tok([r["text"] for r in rows], truncation=True, max_length=32, padding=True,
                             return_tensors="pt")).logits
    # Not bitwise: here one batch pads to the longest of all rows, the stage's batches to their own longest.
    torch.testing.assert_close(logits, torch.tensor([p["logits"] for p in preds]), rtol=1e-4, atol=1e-5)
    assert [p["pred"] for p in preds] == logits.argmax(-1).tolist()


def test_sigterm_checkpoints_and_exits_75(work, tokenizer, mlm_ref):
    spec = classify_spec(work, tokenizer, mlm_ref["output"], 2, "cls-sigterm")
    spec["checkpoint"]["every_steps"] = None  # so the only checkpoint is the signal's
    spec["train"]["max_steps"] = 400
    stage_dir = Path(spec["stage_dir"])
    proc = subprocess.Popen(specs.command(spec), cwd=specs.REPO, env=specs.env(work["hf"]), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (stage_dir / "metrics.jsonl").exists() or not _records(stage_dir, "first_step"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    # As Slurm's --signal does: the workers get the signal (one is enough, the ranks agree).
    workers = psutil.Process(proc.pid).children()
    workers[0].send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # torchrun folds a worker's exit code into its own 1; its failure summary keeps the workers' codes.
    assert proc.returncode != 0
    assert re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", err, re.M) == ["75", "75"], err[-3000:]
    stop = _records(stage_dir, "stop")
    assert len(stop) == 1 and stop[0]["reason"] == "signal" and 0 < stop[0]["step"] < 400
    tag = f"step{stop[0]['step']:08d}"
    assert (stage_dir / "ckpt" / "LATEST").read_text().strip() == tag
    complete = json.loads((stage_dir / "ckpt" / tag / "COMPLETE").read_text())
    assert complete["fingerprint"] == spec["fingerprint"] and complete["step"] == stop[0]["step"]
    assert {p.name for p in (stage_dir / "ckpt" / tag).glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert not (stage_dir / "result.json").exists()


def test_input_digest_mismatch_exits_2(work, tokenizer, mlm_ref):
    """Run as a single process without torchrun, which would fold the exit code into 1."""
    init = dict(mlm_ref["output"], digest="sha256:" + "0" * 64)
    spec = classify_spec(work, tokenizer, init, 1, "cls-bad-digest")
    spec["world_size"] = 1
    spec["train"]["global_batch_size"] = 8
    spec["deepspeed"] = specs.deepspeed_config(1, micro=4, accum=2, world=1, lr=1e-3)
    env = specs.env(work["hf"]) | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(_free_port())}
    argv = [sys.executable, "-m", "stages.classify", "--spec", str(specs.write_spec(spec))]
    result = subprocess.run(argv, cwd=specs.REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("baton stage error: init.digest:") and init["path"] in last
    assert not Path(spec["stage_dir"], "ckpt").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
