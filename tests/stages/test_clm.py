"""The clm stage run for real: torchrun, 2 gloo ranks, DeepSpeed ZeRO-3 on a tiny GPT-2, on CPU.

One module-scoped chain (tokenizer → clm-ref) feeds every test: the blocks the stage trained on are
rebuilt here from the data file and the saved tokenizer, its perplexity is recomputed from final/,
and a run SIGKILLed after its first checkpoint must resume to the reference's exact weights.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.stages import specs

pytestmark = pytest.mark.slow

STEPS, EVERY, BLOCK = 16, 4, 32
TINY_GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 64}"
TRAIN_LINES = 10_300  # more documents than one packing batch (stages.clm.PACK_BATCH): two batches, two remainders
BLANKS = {7: "", 8: "", 500: "   ", 10_100: "\t"}  # line number → blank line written there: no document


# Llama and Qwen2 as transformers builds them: grouped-query attention, rotary positions, RMSNorm.
DECODERS = {family: f"{{model_type: {family}, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
            "num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64}"
            for family in ("llama", "qwen2")}


def clm(name: str, *, block: int = BLOCK, launcher: str = "{}", model: str = TINY_GPT2, steps: int = STEPS) -> str:
    return f"""
  - name: {name}
    kind: clm
    init: {{config: {model}}}
    tokenizer: {{from: tokenizer}}
    launcher: {launcher}
    deepspeed: {{config: zero3}}
    data: {{train: data/train.txt, eval: data/eval.txt}}
    clm: {{block_size: {block}}}
    train: {{max_steps: {steps}, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 2, weight_decay: 0.01, log_every: 2}}
    checkpoint: {{every_steps: {EVERY}}}
    eval: {{every_steps: {EVERY}}}"""


MANIFEST = """version: 1
run: {name: clm}
defaults:
  launcher: {nproc_per_node: 2}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {train: data/train.txt}
    sentencepiece: {vocab_size: 600}""" + clm("clm-ref") + clm("clm-kill") + clm(
    "clm-too-long", block=128, launcher="{nproc_per_node: 1}") + "".join(
    clm(family, model=model, steps=EVERY) for family, model in DECODERS.items()) + "\n"


def write_data(dest: Path) -> dict[str, Path]:
    """WordNet glosses, one document a line, with blank lines among them; copied so tests never write near the repo."""
    dest.mkdir(parents=True, exist_ok=True)
    train = (specs.WORDNET / "pretrain.txt").read_text().splitlines()[:TRAIN_LINES]
    for at, blank in sorted(BLANKS.items()):
        train.insert(at, blank)
    evals = (specs.WORDNET / "pretrain_eval.txt").read_text().splitlines()[:45]
    evals.insert(3, "")
    files = {"train": dest / "train.txt", "eval": dest / "eval.txt"}
    files["train"].write_text("\n".join(train) + "\n")
    files["eval"].write_text("\n".join(evals) + "\n")
    return files


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clm")
    files = write_data(root / "data")
    return {"root": root, "files": files, "stages": specs.Stages(root, MANIFEST, root / "hf")}


@pytest.fixture(scope="module")
def tokenizer(work) -> dict:
    return work["stages"].run("tokenizer")["output"]


@pytest.fixture(scope="module")
def ref(work, tokenizer) -> dict:
    return work["stages"].run("clm-ref")


def expected_blocks(path: Path, tok, block_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(documents, blocks) as the stage must make them, from scratch: each non-blank line tokenized without
    special tokens, then [SEP] (baton's tokenizer has no EOS); per PACK_BATCH documents concatenated and cut into
    full blocks, the remainder dropped."""
    from stages.clm import PACK_BATCH

    texts = [line for line in path.read_text().splitlines() if line.strip()]
    docs = [ids + [tok.sep_token_id] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    blocks = []
    for start in range(0, len(docs), PACK_BATCH):
        stream = [t for doc in docs[start : start + PACK_BATCH] for t in doc]
        blocks += [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    return docs, blocks


def trained_on(work: dict, name: str, split: str) -> list[list[int]]:
    """The blocks of `split` the stage read: its cached arrow file, found as the stage finds it (the cache is
    only read, nothing new is written)."""
    from stages import clm as stage
    from stages.runtime import data, models

    spec = work["stages"].spec(name)
    cached = set(Path(spec.cache_dir, "tokenized").iterdir())
    tok = models.load_tokenizer(spec)
    packed = stage.pack(spec.data, spec.cache_dir, data.tokenizer_digest(spec), data.load_raw(spec), tok,
                        stage.end_of_document(tok), BLOCK)[split]
    assert packed is not None
    assert set(Path(spec.cache_dir, "tokenized").iterdir()) == cached
    assert {Path(f["filename"]) for f in packed.blocks.cache_files} <= cached
    return packed.blocks["input_ids"]


def test_packing_matches_an_independent_rebuild(work, tokenizer, ref):
    from transformers import AutoTokenizer

    from stages.clm import PACK_BATCH

    tok = AutoTokenizer.from_pretrained(tokenizer["path"])
    eos = tok.sep_token_id
    assert tok.eos_token_id is None and eos is not None  # the SEP fallback is what runs here
    for split in ("train", "eval"):
        docs, want = expected_blocks(work["files"][split], tok, BLOCK)
        got = trained_on(work, "clm-ref", split)
        assert len(got) == len(want) > 0
        assert all(len(block) == BLOCK for block in got)
        assert got == want
        assert all(tok.pad_token_id not in block for block in got)
        stream = [t for doc in docs for t in doc]
        assert stream.count(eos) == len(docs)  # one end-of-document token per document, none from the text
        if split == "train":
            lines = work["files"][split].read_text().splitlines()
            assert len(docs) == len(lines) - len(BLANKS) > PACK_BATCH  # blank lines are no documents
        else:  # one packing batch: the blocks are the stream in order, less its tail
            kept = [t for block in got for t in block]
            assert kept == stream[: len(kept)] and len(stream) - len(kept) < BLOCK


def _eval_loss(model, blocks: list[list[int]]) -> float:
    """Mean next-token loss over all blocks, computed apart from the stage."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(blocks)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_eval_perplexity_is_the_final_models_and_beats_the_untrained(work, tokenizer, ref):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    metrics = ref["metrics"]
    assert set(metrics) == {"eval_loss", "perplexity"}
    assert math.isfinite(metrics["eval_loss"]) and metrics["perplexity"] == math.exp(metrics["eval_loss"])

    final = ref["output"]["path"]
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert len(tok) == model.config.vocab_size == 600
    assert model.config.eos_token_id == tok.sep_token_id  # generate() stops where training documents ended
    _, blocks = expected_blocks(work["files"]["eval"], tok, BLOCK)
    assert len(blocks) % 2 == 1  # odd: one rank's eval shard has a padding row, which must not count
    assert metrics["eval_loss"] == pytest.approx(_eval_loss(model, blocks), rel=1e-5)

    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(final)).eval()
    assert metrics["eval_loss"] < _eval_loss(untrained, blocks) - 0.3

    evals = specs.records(Path(final).parent, "eval")
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    assert evals[-1]["eval_loss"] == metrics["eval_loss"] < evals[0]["eval_loss"]


def test_killed_and_resumed_equals_uninterrupted_zero3(work, tokenizer, ref):
    import torch
    from safetensors.torch import load_file

    spec = work["stages"].spec("clm-kill")
    assert spec.fingerprint == work["stages"].spec("clm-ref").fingerprint  # the same settings
    stage_dir = Path(spec.stage_dir)
    work["stages"].kill_after_first_checkpoint(spec)
    result = work["stages"].run("clm-kill", spec)
    start = specs.records(stage_dir, "start")
    assert len(start) == 2 and start[1]["step"] > 0, start  # the rerun resumed instead of starting over

    ref_dir = Path(ref["output"]["path"]).parent
    assert result["steps"] == ref["steps"] == STEPS and result["samples"] == ref["samples"]
    # Bitwise: same world size, fp32, deterministic CPU kernels, data order and dropout RNG from the checkpoint.
    resumed = {r["step"]: r["loss"] for r in specs.records(stage_dir, "train")}
    uninterrupted = {r["step"]: r["loss"] for r in specs.records(ref_dir, "train")}
    assert resumed and all(resumed[s] == uninterrupted[s] for s in resumed)
    assert result["metrics"] == ref["metrics"]
    got = load_file(str(Path(result["output"]["path"], "model.safetensors")))
    want = load_file(str(Path(ref["output"]["path"], "model.safetensors")))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_tokens_per_second_count_every_block_token(ref):
    """Packed blocks have no padding: each step is micro batch 4 × 2 ranks × BLOCK tokens, whatever the speed."""
    records = specs.records(Path(ref["output"]["path"]).parent, "train")
    assert records and all(r["steps_per_s"] > 0 for r in records)
    assert all(r["tokens_per_s"] / r["steps_per_s"] == pytest.approx(4 * 2 * BLOCK, rel=2e-3) for r in records)
    assert all("mfu" not in r for r in records)  # no GPU: no peak to divide by


def test_block_size_over_the_models_positions_exits_2(work, tokenizer):
    """Run as a single process without torchrun, which would fold the exit code into 1."""
    spec = work["stages"].spec("clm-too-long")
    env = work["stages"].env() | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": str(_free_port())}
    argv = [sys.executable, "-m", "stages.clm", "--spec", str(specs.write_spec(spec))]
    result = subprocess.run(argv, cwd=specs.REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("baton stage error: clm.block_size: 128 tokens exceed the 64 positions"), last
    error = json.loads(Path(spec.stage_dir, "error.json").read_text())
    assert error["exit_code"] == 2 and "clm.block_size" in error["message"]
    assert not Path(spec.stage_dir, "ckpt").exists()


def test_end_of_document_token_is_eos_else_sep():
    from stages.clm import end_of_document
    from stages.runtime.spec import SpecError

    assert end_of_document(SimpleNamespace(eos_token_id=5, sep_token_id=3)) == 5
    assert end_of_document(SimpleNamespace(eos_token_id=None, sep_token_id=3)) == 3
    with pytest.raises(SpecError, match="neither an EOS nor a SEP"):
        end_of_document(SimpleNamespace(eos_token_id=None, sep_token_id=None))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family", DECODERS)
def test_other_decoder_families_train_and_export(work, tokenizer, family):
    """The Auto classes carry Llama and Qwen2 (from their configs) through ZeRO-3, eval and export alike."""
    from transformers import AutoModelForCausalLM

    result = work["stages"].run(family)
    assert result["steps"] == EVERY and math.isfinite(result["metrics"]["eval_loss"])
    model = AutoModelForCausalLM.from_pretrained(result["output"]["path"])
    assert model.config.model_type == family and model.config.num_key_value_heads == 1
