"""The prepare stage and clm reading its output.

Fast, in this process: the token files (shards, index, dtype) read back as clm's own packing cuts the same text,
block by block, across shard boundaries; a tokenizer other than the one the corpus was prepared with is refused.

Slow, for real (torchrun, 2 gloo ranks): a tokenizer stage, then prepare over a corpus with blank lines; its shards
split over the ranks hold every document's ids; a preparation SIGKILLed mid-way and run again continues from its
finished shards and gives the byte-identical final/ of an unbroken one; clm from the prepared data trains on the
blocks, in the order, of clm from the text, to the same weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from contract.spec import DataSpec
from stages.runtime import packing, prepared
from stages.runtime.spec import SpecError
from tests.stages import specs

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "log", "big", "small", "red", "blue", "fast", "slow"]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"))


def texts(n: int, seed: int = 0) -> list[str]:
    g = np.random.default_rng(seed)
    rows = [" ".join(g.choice(WORDS, size=int(g.integers(1, 12)))) for _ in range(n)]
    rows[3] = rows[10] = "   "  # blank: no document
    return rows


def write_split(folder: Path, split: str, rows: list[str], tokenizer, shard_rows: int) -> dict:
    """A split as the prepare stage writes it (its shards of `shard_rows` rows), described as in prepared.json."""
    eos = packing.end_of_document(tokenizer)
    described: dict = {"shards": []}
    for i, start in enumerate(range(0, len(rows), shard_rows)):
        docs = packing.documents(tokenizer, rows[start : start + shard_rows], eos)
        prepared.write_shard(folder, split, i, docs, prepared.dtype_for(len(tokenizer)))
        tokens, index = prepared.shard_names(split, i)
        described["shards"].append({"tokens": tokens, "index": index})
    return described


@pytest.mark.parametrize("block_size", [5, 16])
def test_blocks_across_shards_are_those_of_clms_packing(small_tokenizer, tmp_path, block_size):
    rows = texts(120)
    (tmp_path / "train.txt").write_text("\n".join(rows) + "\n")
    described = write_split(tmp_path, "train", rows, small_tokenizer, shard_rows=7)
    blocks = prepared.Blocks(prepared.Stream(tmp_path, described), block_size)

    import datasets

    section = DataSpec(train_files=[str(tmp_path / "train.txt")], eval_files=[], format="text", hub=None,
                       text_field="text", text_pair_field=None, label_field="label", labels=None, max_length=64,
                       digests={})
    raw = {"train": datasets.load_dataset("text", data_files={"train": section.train_files},
                                          cache_dir=str(tmp_path / "ds"))["train"]}
    own = packing.pack(section, str(tmp_path / "cache"), "test", raw, small_tokenizer,
                       packing.end_of_document(small_tokenizer), block_size)["train"]
    assert own is not None
    assert len(blocks) == len(own.blocks) > 17  # more blocks than shards: some span two
    every = list(range(len(blocks)))
    assert blocks[every]["input_ids"].tolist() == own.blocks[every]["input_ids"]
    assert blocks[[4, 0, 4]]["input_ids"].tolist() == [own.blocks[i]["input_ids"] for i in (4, 0, 4)]
    with pytest.raises(IndexError):
        blocks[[len(blocks)]]


def test_shards_hold_uint16_ids_and_a_document_index(small_tokenizer, tmp_path):
    write_split(tmp_path, "train", ["the cat sat", "", "a dog"], small_tokenizer, shard_rows=10)
    tokens = np.load(tmp_path / "train-00000.tokens.npy")
    index = np.load(tmp_path / "train-00000.index.npy")
    sep = small_tokenizer.sep_token_id
    cat = small_tokenizer(["the cat sat", "a dog"], add_special_tokens=False)["input_ids"]
    assert tokens.dtype == np.uint16 and index.dtype == np.int64
    assert tokens.tolist() == cat[0] + [sep] + cat[1] + [sep]
    assert index.tolist() == [0, 4, 7]  # where each document starts, and the end
    assert prepared.dtype_for(2**16) == np.uint16 and prepared.dtype_for(2**16 + 1) == np.uint32
    assert prepared.shard_done(tmp_path, "train", 0)
    (tmp_path / "train-00000.index.npy").unlink()  # a writer killed before the index: the shard is not done
    assert not prepared.shard_done(tmp_path, "train", 0)


def test_another_tokenizer_is_refused(small_tokenizer, tmp_path):
    from transformers import BertTokenizerFast

    from contract.spec import vocabulary

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS[::-1]]))
    other = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))
    meta = {"tokenizer": {"vocabulary": vocabulary(small_tokenizer), "size": len(small_tokenizer)}}
    prepared.check_tokenizer(meta, small_tokenizer)
    with pytest.raises(SpecError, match="prepared with another tokenizer"):
        prepared.check_tokenizer(meta, other)


# ----------------------------------------------------------------- for real, under torchrun

STEPS, BLOCK, LINES, BIG_LINES = 6, 32, 2_000, 40_000
TINY_GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 64}"


def clm(name: str, data: str) -> str:
    return f"""
  - name: {name}
    kind: clm
    init: {{config: {TINY_GPT2}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero2}}
    data: {data}
    clm: {{block_size: {BLOCK}}}
    train: {{max_steps: {STEPS}, micro_batch_size: 4, lr: 3.0e-3, log_every: 2}}
    eval: {{every_steps: {STEPS}}}"""


def prepare(name: str, data: str, shard_rows: int) -> str:
    return f"""
  - name: {name}
    kind: prepare
    tokenizer: {{from: tokenizer}}
    data: {data}
    prepare: {{shard_rows: {shard_rows}}}"""


MANIFEST = ("""version: 1
run: {name: prepare}
defaults:
  launcher: {nproc_per_node: 2}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {train: data/train.txt}
    sentencepiece: {vocab_size: 600}"""
            + prepare("prep", "{train: data/train.txt, eval: data/eval.txt}", 150)
            + prepare("big", "{train: data/big.txt}", 500) + prepare("big-kill", "{train: data/big.txt}", 500)
            + clm("clm-text", "{train: data/train.txt, eval: data/eval.txt}") + clm("clm-prep", "{from: prep}") + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prepare")
    lines = (specs.WORDNET / "pretrain.txt").read_text().splitlines()
    (root / "data").mkdir()
    train = lines[:LINES]
    train[5] = train[700] = " "
    (root / "data" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "data" / "eval.txt").write_text("\n".join((specs.WORDNET / "pretrain_eval.txt").read_text()
                                                      .splitlines()[:60]) + "\n")
    (root / "data" / "big.txt").write_text("\n".join(lines[:BIG_LINES]) + "\n")
    stages = specs.Stages(root, MANIFEST, root / "hf")
    stages.run("tokenizer")
    return {"root": root, "stages": stages}


@pytest.mark.slow
def test_shards_are_split_over_the_ranks_and_hold_every_document(work):
    from transformers import AutoTokenizer

    stages = work["stages"]
    result, out = stages.run_with_output("prep")
    final = Path(result["output"]["path"])
    meta = json.loads((final / "prepared.json").read_text())
    tok = AutoTokenizer.from_pretrained(final)
    rows = (work["root"] / "data" / "train.txt").read_text().splitlines()
    docs = [ids + [tok.sep_token_id] for ids in tok([r for r in rows if r.strip()],
                                                      add_special_tokens=False)["input_ids"]]
    train = meta["splits"]["train"]
    assert [s["tokens"] for s in train["shards"]] == [f"train-{i:05d}.tokens.npy" for i in range(14)]  # 2000/150
    assert (train["rows"], train["documents"], train["tokens"]) == (LINES, LINES - 2, sum(map(len, docs)))
    stream = prepared.Stream(final, train)
    assert stream.span(0, len(stream)).tolist() == [t for d in docs for t in d]
    assert meta["dtype"] == "uint16" and meta["splits"]["eval"]["documents"] == 60
    assert result["metrics"] == {"documents": LINES - 2, "tokens": train["tokens"]}
    # both ranks tokenized shards (their lines share one pipe, so a line may run into another rank's output)
    assert set(re.findall(r"rank (\d+) tokenized", out)) == {"0", "1"}, out[-3000:]
    assert not (Path(stages.folder("prep")) / "shards").exists()


@pytest.mark.slow
def test_a_killed_preparation_continues_to_the_same_bytes(work):
    stages = work["stages"]
    reference = stages.run("big")
    spec = stages.spec("big-kill")
    shards = Path(spec.stage_dir, "shards")
    stages.interrupt(spec, lambda: len(list(shards.glob("*.index.npy"))) >= 4)
    kept = len(list(shards.glob("*.index.npy")))
    assert 4 <= kept < BIG_LINES // 500, "the kill came too late"
    assert not Path(spec.stage_dir, "result.json").exists()
    result, out = stages.run_with_output("big-kill")
    done = sum(int(line.split(" tokenized ")[1].split()[0]) for line in out.splitlines() if " tokenized " in line)
    assert done <= BIG_LINES - kept * 500  # the finished shards were not tokenized again
    ours, theirs = Path(result["output"]["path"]), Path(reference["output"]["path"])
    differ = sorted({p.name for p in ours.iterdir()} ^ {p.name for p in theirs.iterdir()}) + [
        p.name for p in sorted(ours.iterdir()) if (theirs / p.name).is_file() and
        p.read_bytes() != (theirs / p.name).read_bytes()]
    assert not differ, f"final/ differs from the unbroken preparation's in {differ}"
    assert result["output"]["digest"] == reference["output"]["digest"]


@pytest.mark.slow
def test_clm_from_prepared_data_trains_as_clm_from_the_text(work):
    from safetensors.torch import load_file

    stages = work["stages"]
    if "prep" not in stages.outputs:
        stages.run("prep")
    text, prep = stages.run("clm-text"), stages.run("clm-prep")
    assert prep["steps"] == STEPS and prep["metrics"]["perplexity"] == text["metrics"]["perplexity"]
    ours = load_file(Path(prep["output"]["path"], "model.safetensors"))
    theirs = load_file(Path(text["output"]["path"], "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
