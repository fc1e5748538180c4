"""Shared eval sets (stages/runtime/shared_eval.py): stages run for real under torchrun (2 gloo ranks, tiny BERT)
with spec.shared_evals filled in as the launcher would, and their scores checked against the final model.

- classify under ZeRO-1 and ZeRO-3, prune (the pruned model) and a logits ensemble (its combined probabilities):
  `<set>/accuracy`, `macro_f1` and `eval_loss` equal a recomputation from final/ in this process, and join the
  final eval record in metrics.jsonl;
- mlm: a text set that is the stage's own eval file scores the stage's own eval_loss (the same masking);
- clm (in this process, one rank): eval_loss is the mean over each line's predicted tokens;
- a classify set with a label the model was not trained with: the bad-input exit and error.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contract.spec import SharedEvalSpec, Spec
from launcher.digests import data_file_digest
from tests.stages import specs

pytestmark = pytest.mark.slow

MAX_LENGTH = 32


def classify(name: str, zero: int, steps: int = 12) -> str:
    return f"""
  - name: {name}
    kind: classify
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero{zero}}}
    data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: {MAX_LENGTH}}}
    train: {{max_steps: {steps}, micro_batch_size: 4, grad_accum: 2, lr: 1.0e-3, warmup_steps: 2}}"""


MANIFEST = specs.head("shared") + f"""
  - name: mlm
    kind: mlm
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero1}}
    data: {{train: data/pretrain.txt, eval: data/heldout.txt, max_length: {MAX_LENGTH}}}
    train: {{max_steps: 12, micro_batch_size: 8, lr: 1.0e-3, warmup_steps: 2}}""" + classify(
    "cls-z1", 1) + classify("cls-z3", 3) + classify("cls-bad", 1, steps=2) + f"""
  - name: pruned
    kind: prune
    init: {{from: cls-z1}}
    data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: {MAX_LENGTH}}}
    prune: {{task: classify, importance: magnitude, ffn: 0.5, micro_batch_size: 8}}
  - name: ens
    kind: ensemble
    members: [{{from: cls-z1}}, {{from: cls-z3}}]
    data: {{eval: data/supersense_eval.jsonl, max_length: {MAX_LENGTH}}}
    ensemble: {{method: logits, weights: [1, 3], batch_size: 16}}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shared")
    files = specs.copy_data(root / "data")
    # Held-out sets beside the stages' own data: later lines of the WordNet demo files
    pretrain = (specs.WORDNET / "pretrain.txt").read_text().splitlines()
    files["heldout.txt"] = root / "data" / "heldout.txt"
    files["heldout.txt"].write_text("\n".join(pretrain[400:480]) + "\n")
    labelled = (specs.WORDNET / "supersense_eval.jsonl").read_text().splitlines()
    files["heldout.jsonl"] = root / "data" / "heldout.jsonl"
    files["heldout.jsonl"].write_text("\n".join(labelled[100:160]) + "\n")
    files["unknown.jsonl"] = root / "data" / "unknown.jsonl"
    files["unknown.jsonl"].write_text("\n".join([*labelled[100:110], json.dumps({"text": "a thing",
                                                                                 "label": "no-such-label"})]) + "\n")
    stages = specs.Stages(root, MANIFEST, root / "hf")
    stages.run("tokenizer")
    return {"root": root, "files": files, "stages": stages}


def shared_set(path: Path, task: str) -> SharedEvalSpec:
    text = task == "text"
    return SharedEvalSpec(train_files=[], eval_files=[str(path)], format="text" if text else "json", hub=None,
                          text_field="text", text_pair_field=None, label_field="label", labels=None,
                          max_length=MAX_LENGTH, digests={str(path): data_file_digest(str(path))}, task=task)


def with_sets(spec: Spec, **sets: SharedEvalSpec) -> Spec:
    return spec.model_copy(update={"shared_evals": sets})


@pytest.fixture(scope="module")
def cls_z1(work) -> dict:
    stages = work["stages"]
    spec = with_sets(stages.spec("cls-z1"), heldout=shared_set(work["files"]["heldout.jsonl"], "classify"))
    return stages.run("cls-z1", spec)


def recomputed(final: str, path: Path, ensemble=None) -> dict[str, float]:
    """accuracy, macro_f1 and eval_loss of final/ (a classifier, or the logits `ensemble` loaded from it) on a
    jsonl file, one example at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if ensemble is None:
        model = AutoModelForSequenceClassification.from_pretrained(final).eval()
        forward, id2label = (lambda batch: model(**batch).logits), model.config.id2label
    else:
        forward, id2label = (lambda batch: ensemble(**batch)), ensemble.id2label
    label2id = {name: i for i, name in id2label.items()}
    tokenizer = AutoTokenizer.from_pretrained(final)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    labels = torch.tensor([label2id[r["label"]] for r in rows])
    with torch.no_grad():
        logits = torch.cat([forward(tokenizer(r["text"], truncation=True, max_length=MAX_LENGTH,
                                              return_tensors="pt")) for r in rows])
    preds = logits.argmax(-1)
    f1 = []
    for k in set(labels.tolist()) | set(preds.tolist()):
        tp = int(((preds == k) & (labels == k)).sum())
        f1.append(2 * tp / (int((preds == k).sum()) + int((labels == k).sum())))
    return {"accuracy": float((preds == labels).double().mean()), "macro_f1": sum(f1) / len(f1),
            "eval_loss": float(torch.nn.functional.cross_entropy(logits, labels))}


def check_classify_scores(work, result: dict, name: str) -> None:
    metrics = result["metrics"]
    want = recomputed(result["output"]["path"], work["files"]["heldout.jsonl"])
    for metric, value in want.items():
        assert metrics[f"heldout/{metric}"] == pytest.approx(value, abs=1e-5), metric
    assert {"accuracy", "macro_f1", "eval_loss"} <= metrics.keys()  # the stage's own eval is still there
    final_eval = specs.records(work["stages"].folder(name), "eval")[-1]
    assert {k: final_eval[k] for k in metrics if k.startswith("heldout/")} == {f"heldout/{k}": metrics[f"heldout/{k}"]
                                                                              for k in want}


def test_a_classifier_is_scored_on_a_classify_set(work, cls_z1):
    check_classify_scores(work, cls_z1, "cls-z1")


@pytest.fixture(scope="module")
def cls_z3(work) -> dict:
    stages = work["stages"]
    spec = with_sets(stages.spec("cls-z3"), heldout=shared_set(work["files"]["heldout.jsonl"], "classify"))
    return stages.run("cls-z3", spec)


def test_a_zero3_classifier_is_scored_alike(work, cls_z3):
    check_classify_scores(work, cls_z3, "cls-z3")


def test_a_pruned_classifier_is_scored_after_the_cut(work, cls_z1):
    stages = work["stages"]
    spec = with_sets(stages.spec("pruned"), heldout=shared_set(work["files"]["heldout.jsonl"], "classify"))
    check_classify_scores(work, stages.run("pruned", spec), "pruned")


def test_a_logits_ensemble_is_scored_on_its_combined_probabilities(work, cls_z1, cls_z3):
    from stages.runtime.ensemble import load

    stages = work["stages"]
    spec = with_sets(stages.spec("ens"), heldout=shared_set(work["files"]["heldout.jsonl"], "classify"))
    result = stages.run("ens", spec)
    want = recomputed(result["output"]["path"], work["files"]["heldout.jsonl"], load(result["output"]["path"]))
    for metric, value in want.items():
        assert result["metrics"][f"heldout/{metric}"] == pytest.approx(value, abs=1e-5), metric


def test_a_masked_lm_scores_its_own_eval_file_as_its_own_eval(work):
    stages = work["stages"]
    spec = with_sets(stages.spec("mlm"), wiki=shared_set(work["files"]["heldout.txt"], "text"))
    metrics = stages.run("mlm", spec)["metrics"]
    assert metrics["wiki/eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6, abs=1e-6)
    assert metrics["wiki/perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-6)


def test_a_label_the_model_does_not_know_is_bad_input(work):
    stages = work["stages"]
    spec = with_sets(stages.spec("cls-bad"), odd=shared_set(work["files"]["unknown.jsonl"], "classify"))
    proc = stages.launch(spec)
    assert proc.returncode != 0, proc.stdout[-2000:]  # 2; under torchrun, which folds the workers' 2 into its own 1
    error = json.loads(Path(spec.stage_dir, "error.json").read_text())
    assert error["exit_code"] == 2
    assert "evals.odd" in error["message"] and "'no-such-label'" in error["message"]
    assert "is not one of animal, artifact" in error["message"] and "substance (the model's labels)" in error["message"]
    assert not Path(spec.stage_dir, "result.json").exists()


def test_a_causal_lm_is_scored_per_predicted_token_of_each_line(work):
    """In this process (one rank): a tiny GPT-2 on a text set, against each line's own loss from transformers."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from stages.runtime import shared_eval
    from stages.runtime.dist import Dist
    from stages.runtime.spec import SpecError

    spec = work["stages"].spec("mlm")
    tokenizer = AutoTokenizer.from_pretrained(spec.ref("tokenizer").path)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                       n_positions=MAX_LENGTH)).eval()
    path = work["files"]["heldout.txt"]
    d = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    got = shared_eval.score(with_sets(spec, wiki=shared_set(path, "text")), d, model, tokenizer, "clm", batch_size=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for line in path.read_text().splitlines():
            ids = (tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id])[:MAX_LENGTH]
            total += float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss) * (len(ids) - 1)
            count += len(ids) - 1
    assert got["wiki/eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["wiki/perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)
    with pytest.raises(SpecError, match="evals.wiki: a text set, but this stage's model is a classify model"):
        shared_eval.score(with_sets(spec, wiki=shared_set(path, "text")), d, model, tokenizer, "classify",
                          batch_size=4)
