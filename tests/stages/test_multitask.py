"""The multitask stage: task mixing (a pure function of seed and micro-batch, checked against the requested shares
with a chi-square bound), exact resume, per-task metrics everywhere they are reported, and final/'s layout.

The mixing tests and the driver's record of the stage train nothing; the others run 2 gloo ranks forked from a warm
process (tests/stages/forked.py) with DeepSpeed on a tiny BERT."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from contract.kinds.multitask import MultitaskOptions
from stages import multitask
from stages.runtime import mixing
from tests.stages import specs
from tests.test_reliability_launcher import backend, play_stage, run  # noqa: F401 (a fixture)

# ----------------------------------------------------------------- mixing (no training)


def chi_square_bound(dof: int, alpha: float = 1e-6) -> float:
    """An upper bound on the chi-square quantile 1 - alpha (Laurent & Massart 2000: P(X ≥ k + 2√(kx) + 2x) ≤ e^-x)."""
    x = math.log(1 / alpha)
    return dof + 2 * math.sqrt(dof * x) + 2 * x


def options(mixing: str, temperature: float = 1.0, weights: list[float] | None = None) -> MultitaskOptions:
    names = ["a", "b", "c"]
    return MultitaskOptions.model_validate({"mixing": mixing, "temperature": temperature, "tasks": [
        {"name": n, "type": "classify", "weight": None if weights is None else weights[j]}
        for j, n in enumerate(names)]})


@pytest.mark.parametrize(("opts", "sizes", "want"), [
    (options("weights", weights=[1, 2, 5]), [10, 10, 10], [1 / 8, 2 / 8, 5 / 8]),
    (options("weights", weights=[0, 1, 3]), [10, 10, 10], [0, 1 / 4, 3 / 4]),
    (options("temperature", 1.0), [800, 200, 40_000], [800 / 41_000, 200 / 41_000, 40_000 / 41_000]),
    (options("temperature", 2.0), [100, 400, 1600], [10 / 70, 20 / 70, 40 / 70]),
    (options("temperature", 1e6), [100, 400, 1600], [1 / 3, 1 / 3, 1 / 3]),
], ids=["weights", "zero-weight", "T=1", "T=2", "T=inf"])
def test_drawn_task_shares_match_the_requested_ones(opts, sizes, want):
    p = multitask.probabilities(opts, sizes)
    torch.testing.assert_close(p, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    n = 3 * mixing.BLOCK + 123  # across block boundaries
    counts = torch.bincount(torch.tensor(mixing.Draws(p, seed=7).tasks(0, n)), minlength=3).double()
    expected = n * p
    assert all(counts[j] == 0 for j in range(3) if want[j] == 0)  # a weight of 0 is never drawn
    live = expected > 0
    chi2 = float((((counts - expected) ** 2)[live] / expected[live]).sum())
    # Under the requested shares this fails with probability below 1e-6; the seed is fixed, so it is deterministic.
    assert chi2 < chi_square_bound(int(live.sum()) - 1), (counts.tolist(), expected.tolist(), chi2)


def test_draws_are_a_function_of_seed_and_micro_batch():
    p = multitask.probabilities(options("weights", weights=[1, 1, 2]), [1, 1, 1])
    whole = mixing.Draws(p, seed=3).tasks(0, 2 * mixing.BLOCK + 50)
    fresh = mixing.Draws(p, seed=3)
    assert fresh.tasks(mixing.BLOCK + 7, 900) == whole[mixing.BLOCK + 7: mixing.BLOCK + 907]
    m = 2 * mixing.BLOCK + 11
    assert fresh.counts_before(m) == torch.bincount(torch.tensor(whole[:m]), minlength=3).tolist()
    assert mixing.Draws(p, seed=4).tasks(0, 200) != whole[:200]


def test_sampler_resumed_at_a_step_continues_the_same_stream():
    p = multitask.probabilities(options("temperature", 2.0), [7, 30, 5])
    kw = {"seed": 5, "names": ["a", "b", "c"], "micro": 3, "accum": 2, "world": 2, "log": lambda *a, **k: None,
          "log_every": 1000, "max_steps": 10**6}
    for rank in (0, 1):
        straight = mixing.MixedSampler(mixing.Draws(p, 5), [7, 30, 5], rank=rank, step=0, samples=0, **kw)
        steps = [[(b.task, list(b)) for b in straight.next_step()] for _ in range(40)]
        resumed = mixing.MixedSampler(mixing.Draws(p, 5), [7, 30, 5], rank=rank, step=25, samples=25 * 12,
                                         **kw)
        assert [[(b.task, list(b)) for b in resumed.next_step()] for _ in range(15)] == steps[25:]
        assert resumed.samples == straight.samples


# ----------------------------------------------------------------- the stage, for real

STEPS, EVERY = 16, 5


def stage(name: str, zero: int) -> str:
    return f"""
  - name: {name}
    kind: multitask
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero{zero}}}
    multitask:
      mixing: weights
      tasks:
        - {{name: sense, type: classify, weight: 2, loss_weight: 1.0,
           data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}}}}
        - {{name: gloss, type: mlm, weight: 1, loss_weight: 0.5,
           data: {{train: data/pretrain.txt, eval: data/pretrain_eval.txt, max_length: 32}}}}
    train: {{max_steps: {STEPS}, micro_batch_size: 4, grad_accum: 2, lr: 1.0e-3, warmup_steps: 2, log_every: 2}}
    checkpoint: {{every_steps: {EVERY}}}"""


ZEROS = [2, 3]
CASES = [2, pytest.param(3, marks=pytest.mark.full)]
MANIFEST = specs.head("mt") + "".join(
    stage(f"mt-{role}-z{z}", z) for z in ZEROS for role in ("ref", "kill")) + "\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multitask")
    files = specs.copy_data(root / "data")
    lines = (specs.WORDNET / "pretrain_eval.txt").read_text().splitlines()[:60]
    (root / "data" / "pretrain_eval.txt").write_text("\n".join(lines) + "\n")
    stages = specs.Stages(root, MANIFEST, root / "hf")
    stages.run("tokenizer")
    return {"root": root, "files": files, "stages": stages}


@pytest.fixture(scope="module")
def refs(work) -> dict[int, dict]:
    return specs.Lazy(lambda z: work["stages"].run(f"mt-ref-z{z}"))


def _tasks_by_step(folder: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for record in specs.records(folder, "mixing"):
        first = record["step"] - len(record["tasks"]) + 1
        out |= {first + k: tasks for k, tasks in enumerate(record["tasks"])}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero", CASES)
def test_killed_and_resumed_draws_the_same_tasks_and_ends_bitwise_equal(work, refs, zero):
    from safetensors.torch import load_file

    ref = refs[zero]
    spec = work["stages"].spec(f"mt-kill-z{zero}")
    folder = Path(spec.stage_dir)
    work["stages"].kill_after_first_checkpoint(spec)
    result = work["stages"].run(f"mt-kill-z{zero}", spec)
    start = specs.records(folder, "start")
    assert len(start) == 2 and start[1]["step"] > 0, start  # resumed, not started over
    ref_dir = Path(ref["output"]["path"]).parent
    want = _tasks_by_step(ref_dir)
    assert sorted(want) == list(range(1, STEPS + 1))
    got = _tasks_by_step(folder)
    assert all(got[s] == want[s] for s in got) and set(got) >= set(range(start[1]["step"] + 1, STEPS + 1))
    drawn = specs.records(ref_dir, "mixing")[-1]["drawn"]
    assert drawn == {t: sum(step.count(t) for step in want.values()) for t in ("sense", "gloss")}
    assert drawn["sense"] > 0 and drawn["gloss"] > 0
    assert result["metrics"] == ref["metrics"] and result["samples"] == ref["samples"]
    for sub in ("", "tasks/sense"):
        a = load_file(str(Path(result["output"]["path"], sub, "model.safetensors")))
        b = load_file(str(Path(ref["output"]["path"], sub, "model.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


@pytest.mark.slow
@pytest.mark.parametrize("zero", CASES)
def test_each_tasks_loss_is_logged_and_they_make_up_the_train_loss(refs, zero):
    """loss_terms holds each task's own mean loss over the micro-batches that drew it; weighted by loss_weight (sense
    1.0, gloss 0.5) and counted by the window's draws (the mixing record), they give the train record's loss."""
    folder = Path(refs[zero]["output"]["path"]).parent
    terms = {r["step"]: r["terms"] for r in specs.records(folder, "loss_terms")}
    mixing = {r["step"]: r["tasks"] for r in specs.records(folder, "mixing")}
    train = specs.records(folder, "train")
    assert train and sorted(terms) == sorted(mixing) == [r["step"] for r in train]
    weights = {"sense": 1.0, "gloss": 0.5}
    for record in train:
        drawn = Counter(task for step in mixing[record["step"]] for task in step)
        assert set(terms[record["step"]]) == set(drawn)  # a task not drawn in the window has no term
        mean = sum(weights[t] * terms[record["step"]][t] * n for t, n in drawn.items()) / sum(drawn.values())
        assert mean == pytest.approx(record["loss"], rel=1e-9)


@pytest.mark.slow
def test_per_task_metrics_and_final_layout(work, refs):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    ref = refs[2]
    names = {"sense/accuracy", "sense/macro_f1", "sense/eval_loss", "gloss/eval_loss", "gloss/perplexity"}
    assert set(ref["metrics"]) == names
    folder = Path(ref["output"]["path"]).parent
    eval_json = json.loads((folder / "eval.json").read_text())
    assert eval_json["step"] == STEPS and {k: eval_json[k] for k in names} == ref["metrics"]
    final = Path(ref["output"]["path"])
    encoder = AutoModelForMaskedLM.from_pretrained(final)  # the shared encoder with the mlm task's head
    assert sorted(p.name for p in (final / "tasks").iterdir()) == ["sense"]
    model = AutoModelForSequenceClassification.from_pretrained(final / "tasks" / "sense").eval()
    assert model.config.num_labels == 8
    shared = dict(encoder.bert.named_parameters())
    assert all(torch.equal(p, shared[n]) for n, p in model.bert.named_parameters() if n in shared)
    # the exported classifier reproduces the stage's eval accuracy on the eval file
    tok = AutoTokenizer.from_pretrained(final / "tasks" / "sense")
    rows = [json.loads(line) for line in work["files"]["supersense_eval.jsonl"].read_text().splitlines()]
    with torch.no_grad():
        logits = model(**tok([r["text"] for r in rows], truncation=True, max_length=32, padding=True,
                             return_tensors="pt")).logits
    accuracy = sum(model.config.id2label[int(i)] == r["label"] for i, r in zip(logits.argmax(-1), rows, strict=True))
    assert accuracy / len(rows) == pytest.approx(ref["metrics"]["sense/accuracy"], abs=1.5 / len(rows))


def test_ledger_status_and_lineage_show_tasks(tmp_path, backend, capsys):  # noqa: F811
    """Through the driver, the stages played by the stand-in back-end with a multitask stage's metrics: the ledger
    records per-task metrics and every task's data files; the plan, status and lineage show them."""
    specs.copy_data(tmp_path / "data")
    (tmp_path / "data" / "pretrain_eval.txt").write_text("a gloss\nanother gloss\n")
    manifest = tmp_path / "cli.yaml"
    manifest.write_text(specs.head("mtcli") + stage("mt", 2) + "\n")
    metrics = {"sense/accuracy": 0.5, "sense/macro_f1": 0.4, "sense/eval_loss": 1.2, "gloss/eval_loss": 5.0,
               "gloss/perplexity": 148.4}
    backend.act = lambda spec, log_dir: play_stage(spec, log_dir, metrics if spec.kind == "multitask" else {})
    run_dir = tmp_path / "run"
    assert run("run", manifest, "--run-dir", run_dir, "--dry-run") == 0
    dry = capsys.readouterr().out
    for name in ("supersense_train.jsonl", "supersense_eval.jsonl", "pretrain.txt", "pretrain_eval.txt"):
        assert f"data/{name}" in dry
    assert run("run", manifest, "--run-dir", run_dir) == 0
    entry = json.loads((run_dir / "ledger.json").read_text())["stages"]["mt"]
    assert entry["state"] == "done" and entry["metrics"] == metrics
    assert {Path(f).name for f in entry["inputs"]["data"]} == {"supersense_train.jsonl", "supersense_eval.jsonl",
                                                                "pretrain.txt", "pretrain_eval.txt"}
    capsys.readouterr()
    assert run("status", run_dir, "--wide") == 0
    status = capsys.readouterr().out
    row = next(line for line in status.splitlines() if line.startswith("mt "))
    assert "sense/accuracy" in row and "gloss/perplexity" in row, status
    assert run("lineage", run_dir) == 0
    assert capsys.readouterr().out.count("<- data") >= 5  # the tokenizer's file and the four of the tasks
