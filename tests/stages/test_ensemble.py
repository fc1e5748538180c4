"""The `ensemble` kind: manifest checks (fast), and the stage for real (slow: torchrun, 2 gloo ranks, tiny BERTs).

One module-scoped chain (tokenizer → classify members a and b, 8 steps each) feeds every slow test; each test
runs one ensemble stage on them and checks it against an independent computation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.errors import ConfigError
from launcher.manifest import load
from tests.stages import specs

# ----------------------------------------------------------------- manifest checks (fast)

HEAD = """\
version: 1
run: {name: bad}
stages:
  - name: a
    kind: classify
    init: {config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}}
    tokenizer: {pretrained: tok}
    data: {train: train.jsonl, eval: eval.jsonl}
    train: {max_steps: 2}
  - name: b
    kind: classify
    init: {config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}}
    tokenizer: {pretrained: tok}
    data: {train: train.jsonl, eval: eval.jsonl}
    train: {max_steps: 2}
  - name: ens
    kind: ensemble
"""


def problems(tmp_path: Path, stage: str) -> tuple[list[str], int, Path]:
    """The manifest's problems, the line marked `#!` and the manifest's path."""
    (tmp_path / "tok").mkdir(exist_ok=True)
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text('{"text": "a small bird", "label": "animal"}\n')
    text = HEAD + stage
    marked = [n for n, line in enumerate(text.splitlines(), 1) if line.endswith("#!")]
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path)
    return e.value.problems, marked[0], path


@pytest.mark.parametrize(("stage", "where", "says"), [
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: logits, weights: [1, 2, 3]}  #!\n",
     "stages[2].ensemble.weights", "3 weights for 2 members: give one per member"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: logits, weights: [1, -2]}  #!\n",
     "stages[2].ensemble.weights", "each weight must be a finite number ≥ 0"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: logits, weights: [0, 0]}  #!\n",
     "stages[2].ensemble.weights", "the weights sum to 0"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: uniform_soup, weights: [1, 1]}  #!\n",
     "stages[2].ensemble.weights", "weights are for methods logits, task_arithmetic, ties, dare; a uniform_soup "
     "averages"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: greedy_soup}  #!\n",
     "stages[2].ensemble.method", "greedy_soup chooses its members on held-out data: give data.eval"),
    ("    members:\n      - {from: a}\n      - {config: {model_type: bert}}  #!\n    ensemble: {method: logits}\n",
     "stages[2].members[1].config", "a member built from a config would be an untrained model"),
    ("    members: [{from: a}]  #!\n    ensemble: {method: logits}\n",
     "stages[2].members", "at least 2"),
    ("    members: [{from: a}, {from: b}]\n    data: {train: train.jsonl, eval: eval.jsonl}  #!\n"
     "    ensemble: {method: logits}\n", "stages[2].data.train", "only scored, never trained on"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: mean}  #!\n",
     "stages[2].ensemble.method", "'logits', 'uniform_soup', 'greedy_soup', 'task_arithmetic', 'ties', 'dare' or "
     "'slerp'"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: ties}  #!\n",
     "stages[2].ensemble.method", "ties merges the members' differences from the model they were fine-tuned from: "
     "give base"),
    ("    members: [{from: a}, {from: b}]\n    base: {from: a}  #!\n    ensemble: {method: slerp}\n",
     "stages[2].base", "base is for methods task_arithmetic, ties, dare (method is slerp)"),
    ("    members: [{from: a}, {from: b}]\n    base:\n      config: {model_type: bert}  #!\n"
     "    ensemble: {method: dare}\n", "stages[2].base.config", "a base built from a config would be an untrained"),
    ("    members: [{from: a}, {from: b}, {from: a}]  #!\n    ensemble: {method: slerp}\n",
     "stages[2].members", "slerp interpolates between two members, not 3"),
    ("    members: [{from: a}, {from: b}]\n    base: {from: a}\n    ensemble: {method: dare, densities: [0.5]}  #!\n",
     "stages[2].ensemble.densities", "1 densities for 2 members: give one per member"),
    ("    members: [{from: a}, {from: b}]\n    base: {from: a}\n    ensemble: {method: dare, densities: [0, 1]}  #!\n",
     "stages[2].ensemble.densities", "each density must be in (0, 1]"),
    ("    members: [{from: a}, {from: b}]\n    base: {from: a}\n"
     "    ensemble: {method: task_arithmetic, densities: [1, 1]}  #!\n",
     "stages[2].ensemble.densities", "densities is for method ties or dare (method is task_arithmetic)"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: uniform_soup, t: 0.3}  #!\n",
     "stages[2].ensemble.t", "t is for method slerp (method is uniform_soup)"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: slerp, t: 1.5}  #!\n",
     "stages[2].ensemble.t", "less than or equal to 1"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: logits, task: clm, head: {label_set: [a]}}  #!\n",
     "stages[2].ensemble.head", "task clm has no settings of its own"),
    ("    members: [{from: a}, {from: b}]\n    ensemble: {method: logits, task: sft, head: {max_new: 3}}  #!\n",
     "stages[2].ensemble.head.max_new", "Extra inputs are not permitted"),
    ("    members: [{from: a}, {from: b}]\n    data: {eval: eval.jsonl}\n"
     "    ensemble: {method: greedy_soup, task: sft}  #!\n",
     "stages[2].ensemble.method", "greedy_soup chooses by held-out accuracy, which task sft does not report here "
     "(give ensemble.head.label_set)"),
], ids=["weights-length", "weights-negative", "weights-zero-sum", "weights-on-a-soup", "greedy-without-eval",
        "member-config", "one-member", "data-train", "unknown-method", "ties-without-base", "base-on-slerp",
        "base-config", "slerp-of-three", "densities-length", "density-zero", "densities-on-task-arithmetic",
        "t-on-a-soup", "t-above-1", "head-of-clm", "head-unknown-key", "greedy-without-accuracy"])
def test_manifest_refuses(tmp_path: Path, stage: str, where: str, says: str) -> None:
    found, line, path = problems(tmp_path, stage)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{line} {where}: "), found
    assert says in found[0], found


def test_init_from_a_logits_ensemble_is_refused(tmp_path: Path) -> None:
    """A logits ensemble gives no model; a soup does."""
    tail = ("  - name: next\n    kind: classify\n    init: {from: ens}  #!\n"
            "    data: {train: train.jsonl}\n    train: {max_steps: 2}\n")
    found, line, path = problems(tmp_path, "    members: [{from: a}, {from: b}]\n    ensemble: {method: logits}\n"
                                 + tail)
    assert found == [f"{path}:{line} stages[3].init.from: stage 'ens' is a ensemble stage and gives no model "
                     "(it gives: ensemble, tokenizer); use tokenizer.from"]
    soup = HEAD + "    members: [{from: a}, {from: b}]\n    ensemble: {method: uniform_soup}\n" + tail
    path.write_text(soup)
    loaded = load(path)
    assert loaded.manifest.stages[2].outputs() == {"model", "tokenizer"}
    assert loaded.manifest.stages[2].references()["tokenizer"].from_ == "a"  # the first member's


# ----------------------------------------------------------------- the combination rules (fast)


def test_combine_is_the_log_of_the_weighted_mean_probability() -> None:
    from stages.runtime.ensemble import combine

    za, zb = torch.randn(5, 4), torch.randn(5, 4)
    out = combine([za, zb], [3, 1])
    assert torch.allclose(out.exp(), 0.75 * za.softmax(-1) + 0.25 * zb.softmax(-1), atol=1e-6)
    assert torch.allclose(combine([za, zb], [1, 0]), za.log_softmax(-1), atol=1e-6)  # a zero weight drops a member


def test_soup_averages_floats_in_float64_and_keeps_equal_integer_buffers() -> None:
    from stages.runtime.ensemble import Soup, config_difference, state_difference

    ids = torch.arange(4)
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "ids": ids}
    b = {"w": torch.tensor([2.0, 4.0], dtype=torch.float16), "ids": ids.clone()}
    soup = Soup(a)
    assert torch.equal(soup.average(extra=b)["w"], torch.tensor([1.5, 3.0], dtype=torch.float16))
    assert soup.count == 1 and torch.equal(soup.average()["w"], a["w"])  # extra leaves the soup as it was
    soup.add(b)
    assert soup.average()["w"].dtype == torch.float16 and torch.equal(soup.average()["ids"], ids)
    with pytest.raises(ValueError, match="ids: a non-floating tensor that differs"):
        soup.add({"w": a["w"], "ids": ids + 1})
    assert state_difference(a, {"w": torch.zeros(3, dtype=torch.float16), "ids": ids}).startswith("w: (2,)")
    assert state_difference(a, {"w": a["w"]}) == "ids: only in one of them"
    assert config_difference({"hidden_size": 32, "_name_or_path": "x", "transformers_version": "1"},
                             {"hidden_size": 32, "_name_or_path": "y", "transformers_version": "2"}) is None
    assert config_difference({"hidden_size": 32}, {"hidden_size": 64}) == "hidden_size"


def test_members_with_other_labels_are_refused() -> None:
    from types import SimpleNamespace

    from stages.ensemble import same_labels
    from stages.runtime.spec import SpecError

    def config(*labels: str) -> SimpleNamespace:
        return SimpleNamespace(num_labels=len(labels), id2label=dict(enumerate(labels)))

    def spec(labels: list[str] | None) -> Any:
        return SimpleNamespace(data=SimpleNamespace(labels=labels))

    members: Any = SimpleNamespace(names=["a", "b"])
    assert same_labels(spec(None), members, [config("x", "y"), config("x", "y")]) == ["x", "y"]
    with pytest.raises(SpecError, match=r"members a and b have other labels \(\['x', 'y'\] vs \['y', 'x'\]\)"):
        same_labels(spec(None), members, [config("x", "y"), config("y", "x")])
    with pytest.raises(SpecError, match=r"data.labels \['x'\] are not the members' labels"):
        same_labels(spec(["x"]), members, [config("x", "y"), config("x", "y")])


# ----------------------------------------------------------------- the stage (slow)

MEMBER = """
  - name: {name}
    kind: classify
    init: {{config: {tiny}}}
    tokenizer: {{from: tokenizer}}
    seed: {seed}
    deepspeed: {{config: zero1}}
    data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}}
    train: {{max_steps: 8, micro_batch_size: 8, lr: 3.0e-3, log_every: 4}}"""

ENSEMBLE = """
  - name: {name}
    kind: ensemble
    members: {members}
    data: {{eval: data/supersense_eval.jsonl, max_length: 32}}
    ensemble: {{method: {method}, batch_size: 16}}"""

MANIFEST = specs.head("ensemble") + "".join(
    MEMBER.format(name=n, tiny=specs.TINY_BERT, seed=s) for n, s in (("a", 1), ("b", 2))) + "".join(
    ENSEMBLE.format(name=n, members=m, method=k) for n, m, k in (
        ("copies", "[{from: a}, {from: a}]", "uniform_soup"),
        ("greedy", "[{from: b}, {from: a}]", "greedy_soup"),
        ("logits", "[{from: a}, {from: b}]", "logits, weights: [3, 1]"))) + "\n"


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> specs.Stages:
    root = tmp_path_factory.mktemp("ensemble")
    specs.copy_data(root / "data")
    stages = specs.Stages(root, MANIFEST, root / "hf")
    for name in ("tokenizer", "a", "b"):
        stages.run(name)
    return stages


def final_of(stages: specs.Stages, name: str) -> Path:
    return stages.folder(name) / "final"


def eval_batch(stages: specs.Stages) -> tuple[dict[str, torch.Tensor], list[str]]:
    """data.eval tokenized as the stage does (max_length 32), in one padded batch, and its label names."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (stages.run_dir.parent / "data" / "supersense_eval.jsonl").open()]
    tokenizer = AutoTokenizer.from_pretrained(final_of(stages, "a"))
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    return dict(batch), [r["label"] for r in rows]


def logits_of(path: Path, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[int, str]]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**batch).logits.double(), model.config.id2label


def check_accuracy(probs: torch.Tensor, labels: torch.Tensor, reported: float) -> None:
    """Exactly the reported accuracy, up to examples whose top two classes are within float noise."""
    top = probs.topk(2, dim=-1).values
    near_ties = int(((top[:, 0] - top[:, 1]) < 1e-5).sum())
    right = int((probs.argmax(-1) == labels).sum())
    assert abs(reported * len(labels) - right) <= near_ties + 1e-6, (reported, right, near_ties)


def result(stages: specs.Stages, name: str) -> dict[str, Any]:
    return json.loads((stages.folder(name) / "result.json").read_text())


@pytest.mark.slow
def test_uniform_soup_of_two_copies_is_the_model(members: specs.Stages) -> None:
    from safetensors.torch import load_file

    out = members.run("copies")
    soup = load_file(final_of(members, "copies") / "model.safetensors")
    model = load_file(final_of(members, "a") / "model.safetensors")
    assert soup.keys() == model.keys()
    assert all(torch.equal(soup[k], model[k]) and soup[k].dtype == model[k].dtype for k in model)
    m = out["metrics"]
    # two copies of a repeated stage go by position; the soup scores as the model does
    assert m["member/0/accuracy"] == m["member/1/accuracy"] == m["accuracy"]
    assert m["eval_loss"] == pytest.approx(m["member/0/eval_loss"], abs=1e-9)
    assert m["accuracy"] == pytest.approx(result(members, "a")["metrics"]["accuracy"], abs=1e-12)
    assert json.loads((members.folder("copies") / "eval.json").read_text())["accuracy"] == m["accuracy"]
    assert (final_of(members, "copies") / "tokenizer.json").is_file()
    assert not (members.folder("copies") / "final.tmp").exists()


@pytest.mark.slow
def test_greedy_soup_is_never_below_its_best_member(members: specs.Stages) -> None:
    from transformers import AutoModelForSequenceClassification

    out = members.run("greedy")
    m = out["metrics"]
    best = max(m["member/a/accuracy"], m["member/b/accuracy"])
    assert m["accuracy"] >= best
    decisions = specs.records(members.folder("greedy"), "greedy")
    first = "a" if m["member/a/accuracy"] > m["member/b/accuracy"] else "b"  # ties: manifest order (b first)
    second = "b" if first == "a" else "a"
    assert [d["member"] for d in decisions] == [first, second]
    assert decisions[0]["kept"] is True and decisions[0]["accuracy"] == m[f"member/{first}/accuracy"]
    assert decisions[1]["kept"] == (decisions[1]["accuracy"] >= decisions[0]["accuracy"])
    assert m[f"greedy/{second}/kept"] == float(decisions[1]["kept"])
    assert m["ingredients"] == 1 + decisions[1]["kept"]
    if not decisions[1]["kept"]:  # the soup is the best member alone
        assert m["accuracy"] == best
    AutoModelForSequenceClassification.from_pretrained(final_of(members, "greedy"))  # a plain model


@pytest.mark.slow
def test_logits_ensemble_matches_an_independent_recomputation(members: specs.Stages) -> None:
    from stages.runtime.ensemble import load

    out = members.run("logits")
    m = out["metrics"]
    batch, names = eval_batch(members)
    za, id2label = logits_of(final_of(members, "a"), batch)
    zb, _ = logits_of(final_of(members, "b"), batch)
    labels = torch.tensor([{v: k for k, v in id2label.items()}[n] for n in names])

    probs = 0.75 * za.softmax(-1) + 0.25 * zb.softmax(-1)  # weights [3, 1], normalised
    check_accuracy(probs, labels, m["accuracy"])
    nll = -probs.gather(1, labels[:, None]).log().mean()
    assert m["eval_loss"] == pytest.approx(float(nll), abs=1e-5)
    for name, z in (("a", za), ("b", zb)):
        check_accuracy(z.softmax(-1), labels, m[f"member/{name}/accuracy"])
        assert m[f"member/{name}/eval_loss"] == pytest.approx(
            float(torch.nn.functional.cross_entropy(z, labels)), abs=1e-5)
        assert f"member/{name}/macro_f1" in m
    assert specs.records(members.folder("logits"), "eval")[-1]["member/a/accuracy"] == m["member/a/accuracy"]

    final = final_of(members, "logits")
    manifest = json.loads((final / "ensemble.json").read_text())
    assert manifest["method"] == "logits"
    assert [(x["name"], x["weight"], x["path"]) for x in manifest["members"]] == [
        ("a", 0.75, "members/0"), ("b", 0.25, "members/1")]
    assert manifest["labels"] == [id2label[i] for i in range(len(id2label))]
    ensemble = load(final)
    with torch.no_grad():
        combined = ensemble(**batch)
    assert torch.allclose(combined.double().softmax(-1), probs, atol=1e-5)
    assert ensemble.id2label == {int(k): v for k, v in id2label.items()}
