"""The heads (stages/runtime/heads/), in this process on one rank: each head's batches, rows, loss and eval checked
against a direct computation from the model's own logits, and the rule that programs never branch on the objective.

- every head: the rows its module gives are the rows `select` takes of the model's full logits, with the targets
  the batch predicts; the loss is the mean cross-entropy over them (clm: the model's own loss with labels = ids);
- a padding row (index -1) reads row 0 and counts for nothing: no rows, no targets;
- eval: the metrics equal a recomputation over the split; each example's loss is its own rows' mean;
- no program (stages/*.py) nor runtime module outside heads/ compares a task or head with an objective's name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from contract.spec import DataSpec
from stages.runtime import heads
from stages.runtime.dist import Dist

REPO = Path(__file__).resolve().parents[2]
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "log", "big", "small", "red", "blue", "fast", "slow"]
LABELS = ["animal", "thing"]
ONE = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(40):
        n = 3 + int(torch.randint(0, 6, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=g)]
        rows.append({"text": " ".join(words), "label": LABELS[i % 2]})
    out = {}
    for split, part in (("train", rows[:30]), ("eval", rows[30:])):
        out[f"{split}.jsonl"] = folder / f"{split}.jsonl"
        out[f"{split}.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in part))
        out[f"{split}.txt"] = folder / f"{split}.txt"
        out[f"{split}.txt"].write_text("".join(r["text"] + "\n" for r in part) * 6)  # clm: enough for blocks
    return out


def head_of(name: str, tokenizer, files, tmp_path, **options) -> heads.Head:
    ext = "txt" if name == "clm" else "jsonl"
    section = DataSpec(train_files=[str(files[f"train.{ext}"])], eval_files=[str(files[f"eval.{ext}"])],
                       format="text" if ext == "txt" else "json", hub=None, text_field="text", text_pair_field=None,
                       label_field="label", labels=None, max_length=16, digests={})
    source = heads.Source(data=section, tokenizer=tokenizer, tokenizer_digest="test", cache_dir=str(tmp_path),
                          seed=7, options=options)
    return heads.load(name, source)


def model_of(head: heads.Head, tokenizer):
    from transformers import AutoConfig

    torch.manual_seed(0)
    family = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64} \
        if head.name == "clm" else {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}
    config = AutoConfig.for_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  **family, **head.model_args(True))
    return head.auto().from_config(config).eval()


HEADS = [("classify", {}), ("mlm", {"mask_prob": 0.3}), ("clm", {"block_size": 8})]


@pytest.mark.parametrize(("name", "options"), HEADS)
def test_rows_are_the_selected_logits_and_the_loss_their_mean(name, options, tokenizer, files, tmp_path):
    head = head_of(name, tokenizer, files, tmp_path, **options)
    model = model_of(head, tokenizer)
    batch = head.batch("train", [(0, 0), (3, 0), (5, 1)])
    with torch.no_grad():
        rows = head.module(model)(**batch)
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        expected = head.select(full, batch)
        own = model(**batch).loss  # the model's own loss with these labels
    targets = head.targets(batch)
    assert rows.shape == (len(targets), full.shape[-1]) and len(targets) > 0
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-5)
    loss = head.loss(rows, batch)
    assert float(loss) == pytest.approx(float(F.cross_entropy(expected, targets)), rel=1e-5)
    assert float(loss) == pytest.approx(float(own), rel=1e-5)
    assert head.examples(batch).tolist() == sorted(head.examples(batch).tolist())
    assert set(head.examples(batch).tolist()) == {0, 1, 2}


@pytest.mark.parametrize(("name", "options"), HEADS)
def test_a_padding_row_counts_for_nothing(name, options, tokenizer, files, tmp_path):
    head = head_of(name, tokenizer, files, tmp_path, **options)
    alone = head.batch("eval", [(2, -1)])
    padded = head.batch("eval", [(2, -1), (-1, -1)])
    assert torch.equal(head.targets(padded), head.targets(alone))
    assert head.examples(padded).tolist() == head.examples(alone).tolist()
    assert (padded["labels"][1] == -100).all()


@pytest.mark.parametrize(("name", "options"), HEADS)
def test_eval_and_example_losses_recompute(name, options, tokenizer, files, tmp_path):
    head = head_of(name, tokenizer, files, tmp_path, **options)
    model = model_of(head, tokenizer)
    net = head.module(model)
    n = len(head.splits["eval"])
    got = head.evaluate(net, "eval", 4, ONE)
    assert set(got) == set(head.metrics)
    with torch.no_grad():
        batch = head.batch("eval", [(i, -1) for i in range(n)])
        rows, targets = net(**batch), head.targets(batch)
        assert got["eval_loss"] == pytest.approx(float(F.cross_entropy(rows, targets)), rel=1e-5)
        if "accuracy" in got:
            assert got["accuracy"] == pytest.approx(float((rows.argmax(-1) == targets).double().mean()))
        each = head.example_losses(net, [4, 1])
        for j, i in enumerate([4, 1]):
            one = head.batch("train", [(i, -1)])
            assert float(each[j]) == pytest.approx(float(F.cross_entropy(net(**one), head.targets(one))), rel=1e-5)


def test_classify_reads_a_models_own_labels(tokenizer, files, tmp_path):
    source = head_of("classify", tokenizer, files, tmp_path).source
    from dataclasses import replace

    head = heads.load("classify", replace(source, labels=["thing", "animal"], eval_only=True))
    assert head.classes == ["thing", "animal"] and head.splits.keys() == {"eval"}
    batch = head.batch("eval", [(0, -1)])
    expected = ["thing", "animal"].index(json.loads(files["eval.jsonl"].read_text().splitlines()[0])["label"])
    assert batch["labels"].tolist() == [expected]


# What an objective's branch looks like: a task, type or head compared with an objective's name
BRANCH = re.compile(r"""(task|type|head|kind)\w*\s*(==|!=|\bin\b)\s*\(?["'](classify|mlm|clm|sft)["']""")


def test_no_program_branches_on_the_objective():
    found = []
    for path in [*REPO.glob("stages/*.py"), *REPO.glob("stages/runtime/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCH.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "ask the head (stages/runtime/heads/) instead:\n" + "\n".join(found)


# ----------------------------------------------------------------- labels: a bad row anywhere is exit 2, file:row


def labelled(folder: Path, name: str, bad: dict[int, object], rows: int = 150) -> Path:
    """A JSON lines file of `rows` rows labelled animal/thing, with the label of row i (0-based) set to bad[i]
    (missing where bad[i] is `...`)."""
    lines = []
    for i in range(rows):
        row: dict[str, object] = {"text": f"{WORDS[i % len(WORDS)]} cat", "label": LABELS[i % 2]}
        if i in bad:
            if bad[i] is ...:
                del row["label"]
            else:
                row["label"] = bad[i]
        lines.append(json.dumps(row))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def classify_head(tokenizer, tmp_path: Path, train: Path, eval_: Path | None = None,
                  labels: list[str] | None = None) -> heads.Head:
    section = DataSpec(train_files=[str(train)], eval_files=[str(eval_)] if eval_ else [], format="json", hub=None,
                       text_field="text", text_pair_field=None, label_field="label", labels=labels, max_length=16,
                       digests={})
    return heads.load("classify", heads.Source(data=section, tokenizer=tokenizer, tokenizer_digest="test",
                                               cache_dir=str(tmp_path / "cache"), seed=7))


@pytest.mark.parametrize(("bad", "says"), [
    ({140: None}, "row 141: label is null; every row needs a label"),
    ({120: ...}, "row 121: label is null; every row needs a label"),  # datasets reads a missing field as null
    ({4: 3}, "row 5: label is 3, a number, where row 1's is a string 'animal'; one label column holds one type"),
    ({130: 1.5}, "row 131: label is 1.5, not a string or an integer"),
], ids=["null", "missing", "number-among-strings", "float"])
def test_a_bad_label_anywhere_is_a_spec_error_naming_file_and_row(tokenizer, tmp_path, bad, says):
    from stages.runtime.spec import SpecError

    train = labelled(tmp_path, "train", bad)
    with pytest.raises(SpecError) as e:
        classify_head(tokenizer, tmp_path, train)
    assert str(e.value) == f"data: {train}: {says}"


def test_labels_outside_data_labels_or_the_training_data_name_file_and_row(tokenizer, tmp_path):
    from stages.runtime.spec import SpecError

    train = labelled(tmp_path, "train", {140: "plant"})
    with pytest.raises(SpecError, match=rf"^data: {train}: row 141: label 'plant' is not one of animal, thing "
                                        r"\(data.labels\)$"):
        classify_head(tokenizer, tmp_path, train, labels=["animal", "thing"])
    train = labelled(tmp_path, "train2", {})
    eval_ = labelled(tmp_path, "eval", {7: "plant"}, rows=10)
    with pytest.raises(SpecError, match=rf"^data: {eval_}: row 8: label 'plant' is not one of animal, thing "
                                        r"\(the training data's labels\)$"):
        classify_head(tokenizer, tmp_path, train, eval_)
    head = classify_head(tokenizer, tmp_path, train, labelled(tmp_path, "eval-ok", {}, rows=10))
    assert head.names == ["animal", "thing"] and head.labels["train"].tolist() == [i % 2 for i in range(150)]


# ----------------------------------------------------------------- text: cut before tokenizing; bad rows; which rank


class Spy:
    """A tokenizer that notes the longest text it was handed."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, set()

    def __call__(self, text, pair=None, **kwargs):
        self.lengths |= {*map(len, text), *map(len, pair or [])}
        return self.tokenizer(text, pair, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_row_is_cut_before_the_tokenizer_sees_it_to_the_same_tokens(tokenizer, tmp_path):
    from stages.runtime import data

    huge = " ".join(WORDS[i % len(WORDS)] for i in range(800_000))  # 3.3 MB of words
    glued = "x" * 2_000_000  # no white space: one word, [UNK] whole
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": "animal"}) + "\n" for t in ("the cat", huge, glued)))
    section = DataSpec(train_files=[str(path)], eval_files=[], format="json", hub=None, text_field="text",
                       text_pair_field=None, label_field="label", labels=None, max_length=16, digests={})
    raw = data.load_section(section, str(tmp_path / "cache"))
    spy = Spy(tokenizer)
    ids = data.tokenize_data(section, str(tmp_path / "cache"), raw, spy, "test")["train"]["input_ids"]
    assert len(huge) not in spy.lengths and max(spy.lengths - {len(glued)}) <= 16 * data.CHARS_PER_TOKEN
    # one glued word gives WordPiece one [UNK], short of max_length: the whole row is tokenized again to be sure
    assert len(glued) in spy.lengths
    whole = tokenizer(["the cat", huge, glued], truncation=True, max_length=16)["input_ids"]
    assert ids == whole


def test_a_null_or_numeric_text_past_the_sample_names_file_and_row(tokenizer, tmp_path):
    from stages.runtime import data
    from stages.runtime.spec import SpecError

    for bad, says in ((None, "text is null; every row needs its text"), (7, "text is 7, not a string")):
        path = tmp_path / "train.jsonl"
        rows = [{"text": f"{WORDS[i % len(WORDS)]} cat", "label": "animal"} for i in range(150)]
        rows[140]["text"] = bad
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        section = DataSpec(train_files=[str(path)], eval_files=[], format="json", hub=None, text_field="text",
                           text_pair_field=None, label_field="label", labels=None, max_length=16, digests={})
        raw = data.load_section(section, str(tmp_path / f"cache-{bad}"))
        with pytest.raises(SpecError) as e:
            data.tokenize_data(section, str(tmp_path / f"cache-{bad}"), raw, tokenizer, "test")
        assert str(e.value) == f"data: {path}: row 141: {says}"


def test_a_rank_that_fails_to_tokenize_is_named_with_its_error_on_every_rank(tokenizer, tmp_path, monkeypatch):
    """This process plays rank 0 of 2, whose share maps fine; rank 1's failed (its error arrives through the
    gather): rank 0 says which rank failed, on which rows, and why."""
    import datasets

    from stages.runtime import data, dist
    from stages.runtime.spec import SpecError

    ds = datasets.Dataset.from_dict({"text": [f"{WORDS[i % len(WORDS)]} cat" for i in range(10)]})
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    gathered = iter([[None, None], None])

    def gather(obj):
        got = next(gathered)
        return got if got is not None else [obj, "MemoryError: cannot allocate 104857600 bytes"]

    monkeypatch.setattr(dist, "all_gather_objects", gather)
    monkeypatch.setattr(dist, "any_rank", lambda flag: True)
    with pytest.raises(SpecError) as e:
        data.map_by_rank(ds, lambda batch: {"n": [len(t) for t in batch["text"]]}, key="k", path=tmp_path / "m")
    assert str(e.value) == ("data: rank 1 failed to tokenize its share (rows 6-10 of 10): "
                            "MemoryError: cannot allocate 104857600 bytes")
