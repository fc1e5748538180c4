"""Stages run for real: torchrun, 2 gloo ranks, DeepSpeed ZeRO 1/2/3 on a tiny BERT, on CPU.

One module-scoped chain (tokenizer → mlm → classify) feeds every test; each
ZeRO stage of classify gets an uninterrupted reference run and a run that is
SIGKILLed after its first complete checkpoint and then rerun to completion.
(mlm's kill-and-resume runs through the launcher in tests/test_resume.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stages import specs

pytestmark = pytest.mark.slow

ZEROS = [1, 2, 3]
# ZeRO-3's kill and resume is also proven by sft, dpo, clm and adapters: `make test` leaves classify's to test-full
CASES = [1, 2, pytest.param(3, marks=pytest.mark.full)]
STEPS, EVERY = 24, 6


def classify(name: str, zero: int, *, train: str = f"max_steps: {STEPS}", checkpoint: str = f"every_steps: {EVERY}",
             launcher: str = "{}", precision: str = "fp32") -> str:
    return f"""
  - name: {name}
    kind: classify
    precision: {precision}
    init: {{from: mlm-ref-z1}}
    tokenizer: {{from: tokenizer}}
    launcher: {launcher}
    deepspeed: {{config: zero{zero}}}
    data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}}
    train: {{{train}, micro_batch_size: 4, grad_accum: 2, lr: 1.0e-3, warmup_steps: 2, weight_decay: 0.01,
             log_every: 2}}
    checkpoint: {{{checkpoint}}}"""


# Every stage these tests run, resolved by the launcher: the kill runs share their reference's settings.
MANIFEST = specs.head("stages") + f"""
  - name: mlm-ref-z1
    kind: mlm
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero1}}
    data: {{train: data/pretrain.txt, eval: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: {STEPS}, micro_batch_size: 8, lr: 1.0e-3, warmup_steps: 2, weight_decay: 0.01, log_every: 2}}
    checkpoint: {{every_steps: {EVERY}}}
    eval: {{every_steps: {EVERY}}}""" + "".join(
    classify(f"cls-{role}-z{z}", z) for z in ZEROS for role in ("ref", "kill")) + classify(
    "cls-torchrun-z2", 2) + classify(
    "cls-sigterm", 2, train="max_steps: 400", checkpoint="keep_last: 2") + classify(
    "cls-bad-digest", 1, launcher="{nproc_per_node: 1}") + "".join(
    classify(f"cls-bf16-z{z}", z, train="max_steps: 6", precision="bf16") for z in (2, 3)) + "\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stages")
    files = specs.copy_data(root / "data")
    return {"root": root, "files": files, "stages": specs.Stages(root, MANIFEST, root / "hf")}


@pytest.fixture(scope="module")
def tokenizer(work) -> dict:
    return work["stages"].run("tokenizer")["output"]


@pytest.fixture(scope="module")
def mlm_ref(work, tokenizer) -> dict:
    result = work["stages"].run("mlm-ref-z1")
    assert result["metrics"]["perplexity"] > 1
    return result


@pytest.fixture(scope="module")
def classify_refs(work, tokenizer, mlm_ref) -> dict[int, dict]:
    return specs.Lazy(lambda z: work["stages"].run(f"cls-ref-z{z}"))


def test_tokenizer_final_loads_with_autotokenizer(tokenizer):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer["path"])
    assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == \
        ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
    ids = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
    assert ids == [0, 1, 2, 3, 4]
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


def _assert_resumed_like(ref: dict, name: str, work: dict) -> None:
    spec = work["stages"].spec(name)
    stage_dir = Path(spec.stage_dir)
    work["stages"].kill_after_first_checkpoint(spec)
    result = work["stages"].run(name, spec)
    start = specs.records(stage_dir, "start")
    assert len(start) == 2 and start[1]["step"] > 0, start  # the rerun resumed instead of starting over
    complete = sorted(p.parent.name for p in stage_dir.glob("ckpt/step*/COMPLETE"))
    assert len(complete) <= spec.checkpoint.keep_last
    assert (stage_dir / "ckpt" / "LATEST").read_text().strip() == complete[-1]

    ref_dir = Path(ref["output"]["path"]).parent
    assert result["steps"] == ref["steps"] == STEPS and result["samples"] == ref["samples"]
    # Bitwise: same world size, fp32, deterministic CPU kernels, and every source of randomness
    # (data order, masking, dropout RNG) restored from the checkpoint.
    resumed_losses = {r["step"]: r["loss"] for r in specs.records(stage_dir, "train")}
    ref_losses = {r["step"]: r["loss"] for r in specs.records(ref_dir, "train")}
    assert all(resumed_losses[s] == ref_losses[s] for s in resumed_losses)
    assert result["metrics"] == ref["metrics"]
    got, want = _safetensors(result["output"]["path"]), _safetensors(ref["output"]["path"])
    assert got.keys() == want.keys()
    import torch

    assert all(torch.equal(got[k], want[k]) for k in want)


def test_forked_ranks_train_as_torchrun_does(work, tokenizer, mlm_ref, classify_refs):
    """The ranks this tier forks from a warm process (tests/stages/forked.py) against ranks under real torchrun:
    the same settings give the same losses, metrics and bitwise the same weights."""
    import torch

    spec = work["stages"].spec("cls-torchrun-z2")
    ref = classify_refs[2]
    assert spec.fingerprint == work["stages"].spec("cls-ref-z2").fingerprint
    proc = subprocess.run(work["stages"].command(spec), cwd=specs.REPO, env=work["stages"].env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(Path(spec.stage_dir, "result.json").read_text())
    losses = [{r["step"]: r["loss"] for r in specs.records(Path(folder), "train")}
              for folder in (spec.stage_dir, Path(ref["output"]["path"]).parent)]
    assert losses[0] == losses[1] and result["metrics"] == ref["metrics"]
    got, want = _safetensors(result["output"]["path"]), _safetensors(ref["output"]["path"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("zero", CASES)
def test_classify_killed_and_resumed_equals_uninterrupted(work, tokenizer, mlm_ref, classify_refs, zero):
    ref = classify_refs[zero]
    assert set(ref["metrics"]) == {"eval_loss", "accuracy", "macro_f1"}
    kill = work["stages"].spec(f"cls-kill-z{zero}")
    assert kill.fingerprint == work["stages"].spec(f"cls-ref-z{zero}").fingerprint  # the same settings
    _assert_resumed_like(ref, f"cls-kill-z{zero}", work)


@pytest.mark.parametrize("zero", CASES)
def test_classify_final_reproduces_eval_predictions(work, classify_refs, zero):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    final = classify_refs[zero]["output"]["path"]
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    rows = [json.loads(line) for line in work["files"]["supersense_eval.jsonl"].read_text().splitlines()]
    predictions = Path(final).parent / "eval_predictions.jsonl"
    preds = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [p["index"] for p in preds] == list(range(len(rows)))
    assert all(model.config.id2label[p["label"]] == r["label"] for p, r in zip(preds, rows, strict=True))
    with torch.no_grad():
        logits = model(**tok([r["text"] for r in rows], truncation=True, max_length=32, padding=True,
                             return_tensors="pt")).logits
    # Not bitwise: here one batch pads to the longest of all rows, the stage's batches to their own longest.
    torch.testing.assert_close(logits, torch.tensor([p["logits"] for p in preds]), rtol=1e-4, atol=1e-5)
    assert [p["pred"] for p in preds] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("zero", [pytest.param(2, marks=pytest.mark.full), 3])
def test_bf16_trains_on_fp32_master_weights_and_hands_them_on(work, tokenizer, mlm_ref, zero):
    import math

    import torch
    from safetensors.torch import load_file

    result = work["stages"].run(f"cls-bf16-z{zero}")
    final = Path(result["output"]["path"])
    assert all(math.isfinite(r["loss"]) for r in specs.records(final.parent, "train"))
    weights = load_file(str(final / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    # The optimizer's fp32 masters, not the bf16 working copy (which holds 8 significant bits and round-trips)
    for name in ("classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        assert not torch.equal(weights[name].to(torch.bfloat16).float(), weights[name]), name


def test_sigterm_checkpoints_and_exits_75(work, tokenizer, mlm_ref):
    spec = work["stages"].spec("cls-sigterm")  # no checkpoint.every_steps: the only checkpoint is the signal's
    stage_dir = Path(spec.stage_dir)
    codes = work["stages"].interrupt(spec, specs.stepped(stage_dir), signal.SIGTERM)
    assert codes == [75, 75], codes  # rank 0 got the signal; rank 1 stopped with it at the same step
    stop = specs.records(stage_dir, "stop")
    assert len(stop) == 1 and stop[0]["reason"] == "signal" and 0 < stop[0]["step"] < 400
    tag = f"step{stop[0]['step']:08d}"
    assert (stage_dir / "ckpt" / "LATEST").read_text().strip() == tag
    complete = json.loads((stage_dir / "ckpt" / tag / "COMPLETE").read_text())
    assert complete["fingerprint"] == spec.fingerprint and complete["step"] == stop[0]["step"]
    assert {p.name for p in (stage_dir / "ckpt" / tag).glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert not (stage_dir / "result.json").exists()


def test_input_digest_mismatch_exits_2(work, tokenizer, mlm_ref):
    """Run as a single process without torchrun, which would fold the exit code into 1."""
    init = dict(mlm_ref["output"], digest="sha256:" + "0" * 64)
    spec = work["stages"].spec("cls-bad-digest", {"mlm-ref-z1": init})
    env = work["stages"].env() | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": str(_free_port())}
    argv = [sys.executable, "-m", "stages.classify", "--spec", str(specs.write_spec(spec))]
    result = subprocess.run(argv, cwd=specs.REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("baton stage error: inputs.init.digest:") and init["path"] in last
    assert not Path(spec.stage_dir, "ckpt").exists()
    error = json.loads(Path(spec.stage_dir, "error.json").read_text())
    assert error["exit_code"] == 2 and "inputs.init.digest" in error["message"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
