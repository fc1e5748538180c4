"""Knowledge distillation (kind `distill`): the loss against hand-computed tensors, keep_layers on BERT and GPT-2,
the manifest's checks; and real stages under torchrun (2 gloo ranks, DeepSpeed on CPU): a distilled student agrees
with its teacher more than the same student trained alone, a ZeRO-3-partitioned teacher teaches exactly as a
replicated one, and the teacher is left as it was.

The slow tests share one module-scoped chain: tokenizer → teacher (a tiny 2-layer BERT classifier) → the students.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.stages import specs

# ----------------------------------------------------------------- fast: the loss


def _by_hand(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """KL(p_T ‖ p_S) of softmax(z / T), summed over classes, averaged over rows, in plain Python."""

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    total = 0.0
    for s, q in zip(student, teacher, strict=True):
        p_s, p_t = softmax(s), softmax(q)
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    return total / len(student)


Z_STUDENT = [[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]]
Z_TEACHER = [[2.0, 0.0, 1.0], [-1.0, 1.5, 0.5]]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_the_loss_is_the_formula(alpha, t):
    import torch

    from stages.distill import distill_loss

    task = torch.tensor(0.7)
    loss, kd = distill_loss(torch.tensor(Z_STUDENT), torch.tensor(Z_TEACHER), task, alpha, t)
    kl = _by_hand(Z_STUDENT, Z_TEACHER, t)
    assert float(kd) == pytest.approx(kl, rel=1e-6)
    assert float(loss) == pytest.approx((1 - alpha) * 0.7 + alpha * t * t * kl, rel=1e-6)
    if alpha == 0:
        assert float(loss) == pytest.approx(0.7, rel=1e-7)  # the task loss alone
    if alpha == 1:
        assert float(loss) == pytest.approx(t * t * kl, rel=1e-6)


def test_the_kd_term_is_zero_when_student_is_teacher_and_has_gradients():
    import torch

    from stages.distill import distill_loss

    z = torch.tensor(Z_STUDENT, requires_grad=True)
    loss, kd = distill_loss(z, torch.tensor(Z_STUDENT), torch.tensor(0.0), 1.0, 2.0)
    assert float(kd.detach()) == pytest.approx(0.0, abs=1e-7)
    loss2, _ = distill_loss(z, torch.tensor(Z_TEACHER), torch.tensor(0.0), 1.0, 2.0)
    loss2.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# ----------------------------------------------------------------- fast: keep_layers

BERT = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
        "intermediate_size": 32, "vocab_size": 50}
GPT2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 4, "n_head": 2, "vocab_size": 50, "n_positions": 32}


@pytest.mark.parametrize(("config", "prefix"), [(BERT, "bert.encoder.layer"), (GPT2, "transformer.h")])
@pytest.mark.parametrize(("keep", "kept"), [("every_other", [0, 2]), ([1, 3], [1, 3]), ([2], [2])])
def test_keep_layers_keeps_exactly_the_named_layers(config, prefix, keep, kept):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from stages.runtime import pruning

    auto = AutoModelForMaskedLM if config["model_type"] == "bert" else AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(AutoConfig.for_model(**config))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert pruning.keep_layers(model, keep, "distill.keep_layers") == kept
    after = model.state_dict()
    assert model.config.num_hidden_layers == len(kept)
    for new, old in enumerate(kept):
        mine = {k.removeprefix(f"{prefix}.{new}."): v for k, v in after.items() if k.startswith(f"{prefix}.{new}.")}
        theirs = {k.removeprefix(f"{prefix}.{old}."): v for k, v in before.items() if k.startswith(f"{prefix}.{old}.")}
        assert mine.keys() == theirs.keys() and mine
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not any(k.startswith(f"{prefix}.{len(kept)}.") for k in after)
    others = {k for k in before if not k.startswith(f"{prefix}.")}
    assert all(torch.equal(after[k], before[k]) for k in others)  # embeddings, head
    # the pruned model still runs, and a model built from its saved config has the same shape
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 50)
    rebuilt = auto.from_config(AutoConfig.for_model(**model.config.to_dict()))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in after.items()}


def test_keep_layers_refuses_what_it_cannot_do():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from stages.runtime import pruning
    from stages.runtime.spec import SpecError

    bert = AutoModelForMaskedLM.from_config(AutoConfig.for_model(**BERT))
    with pytest.raises(SpecError, match=r"distill.keep_layers: \[1, 4\]: the model has 4 layers"):
        pruning.keep_layers(bert, [1, 4], "distill.keep_layers")
    t5 = AutoModelForMaskedLM.from_config(AutoConfig.for_model(
        "distilbert", dim=16, n_layers=2, n_heads=2, hidden_dim=32, vocab_size=50))
    with pytest.raises(SpecError, match="distill.keep_layers: model_type 'distilbert' is not supported"):
        pruning.keep_layers(t5, "every_other", "distill.keep_layers")
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(**GPT2, scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(SpecError, match="scale_attn_by_inverse_layer_idx"):
        pruning.keep_layers(gpt2, [1, 3], "distill.keep_layers")


# ----------------------------------------------------------------- fast: teacher and student must match


def _tokenizer(folder: Path, words: list[str]):
    """A small word-level tokenizer saved to `folder` (and returned)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(folder)
    return tok


def _refs(teacher: Path, student: Path):
    from types import SimpleNamespace

    paths = {"teacher": str(teacher), "tokenizer": str(student)}
    return SimpleNamespace(ref=lambda name: SimpleNamespace(path=paths[name]))


@pytest.mark.parametrize("task", ["classify", "mlm", "clm"])
def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, task):
    from transformers import AutoConfig

    from stages.runtime import teacher
    from stages.runtime.spec import SpecError

    mine = _tokenizer(tmp_path / "student", ["cat", "dog", "tree"])
    _tokenizer(tmp_path / "same", ["cat", "dog", "tree"])
    teacher.check_tokenizer(_refs(tmp_path / "same", tmp_path / "student"), mine, task)  # the same: no complaint
    _tokenizer(tmp_path / "other", ["dog", "cat", "tree"])
    with pytest.raises(SpecError, match=r"inputs.teacher: .*other was trained with another tokenizer than the "
                       r"student's .* 2 of the model's 8 tokens have another id"):
        teacher.check_tokenizer(_refs(tmp_path / "other", tmp_path / "student"), mine, task)
    # a teacher folder without a tokenizer: its vocab_size decides
    AutoConfig.for_model("bert", vocab_size=9).save_pretrained(tmp_path / "bare")
    if task == "classify":
        teacher.check_tokenizer(_refs(tmp_path / "bare", tmp_path / "student"), mine, task)  # 9 ≥ 8 ids fit
    else:
        with pytest.raises(SpecError, match="has no tokenizer and a vocabulary of 9 tokens, the student's"):
            teacher.check_tokenizer(_refs(tmp_path / "bare", tmp_path / "student"), mine, task)


def test_a_classifier_teacher_with_other_labels_is_refused():
    from types import SimpleNamespace

    import torch

    from stages.runtime import teacher
    from stages.runtime.spec import SpecError

    def tutor(id2label: dict[int, str]) -> teacher.Teacher:
        model = SimpleNamespace(config=SimpleNamespace(num_labels=2, id2label=id2label))
        return teacher.Teacher(model, model, "replicate", where=torch.device("cpu"), out=torch.device("cpu"))

    tutor({0: "a", 1: "b"}).check_labels(["a", "b"])
    with pytest.raises(SpecError, match=r"its labels \['b', 'a'\] .* are not the student's \['a', 'b'\]"):
        tutor({0: "b", 1: "a"}).check_labels(["a", "b"])


# ----------------------------------------------------------------- fast: the manifest

MANIFEST_HEAD = """version: 1
run: {name: x}
stages:
  - name: teacher
    kind: classify
    init: {pretrained: bert-base-uncased}
    data: {train: data.jsonl}
    train: {max_steps: 1}
  - name: student
    kind: distill
    init: {from: teacher}
    data: {train: data.jsonl}
    train: {max_steps: 1}
"""


@pytest.mark.parametrize(("lines", "key", "says"), [
    ("teacher: {from: teacher}\n    distill: {task: classify, alpha: 1.5}  #!", "distill.alpha",
     "less than or equal to 1"),
    ("teacher: {from: teacher}\n    distill: {task: classify, alpha: -0.1}  #!", "distill.alpha",
     "greater than or equal to 0"),
    ("teacher: {from: teacher}\n    distill: {task: classify, temperature: 0}  #!", "distill.temperature",
     "greater than 0"),
    ("teacher: {from: teacher}\n    distill: {task: classify, temperature: .inf}  #!", "distill.temperature",
     "not a finite number"),
    ("teacher: {from: teacher}\n    distill: {task: classify, alpha: true}  #!", "distill.alpha", "not a boolean"),
    ("teacher: {from: teacher}\n    distill: {task: classify, keep_layers: [2, 1]}  #!", "distill.keep_layers",
     "increasing order"),
    ("teacher: {from: teacher}\n    distill: {task: classify, keep_layers: [0, 0]}  #!", "distill.keep_layers",
     "repeats"),
    ("teacher: {from: teacher}\n    distill: {task: classify, keep_layers: [-1]}  #!", "distill.keep_layers",
     "0 or more"),
    ("teacher: {from: teacher}\n    distill: {task: classify, keep_layers: []}  #!", "distill.keep_layers",
     "keeps no layer"),
    ("teacher: {from: teacher}\n    distill: {task: classify, keep_layers: all}  #!", "distill.keep_layers",
     "every_other"),
    ("teacher: {from: teacher}\n    distill: {task: classify, mask_prob: 0.2}  #!", "distill.mask_prob",
     "for task mlm"),
    ("teacher: {from: teacher}\n    distill: {task: mlm, block_size: 64}  #!", "distill.block_size", "for task clm"),
    ("teacher: {from: teacher}\n    distill: {task: regression}  #!", "distill.task",
     "'regression' is not a head; heads: classify"),
    ("teacher: {from: teacher}\n    distill: {task: classify, teacher_placement: gpu}  #!",
     "distill.teacher_placement", "'replicate', 'zero3' or 'cpu'"),
    ("teacher:\n      config: {model_type: bert}  #!\n    distill: {task: classify}", "teacher.config",
     "teaches nothing"),
    ("teacher: {from: nobody}  #!\n    distill: {task: classify}", "teacher.from", "unknown earlier stage 'nobody'"),
    ("distill: {task: classify}", "teacher", "required"),  # a missing key: the stage's own line
])
def test_bad_distill_settings_are_refused_naming_file_line_and_key(tmp_path, lines, key, says):
    from launcher.errors import ConfigError
    from launcher.manifest import load

    (tmp_path / "data.jsonl").write_text('{"text": "a", "label": "x"}\n')
    text = MANIFEST_HEAD + "    " + lines + "\n"
    path = tmp_path / "m.yaml"
    path.write_text(text)
    marked = [i for i, row in enumerate(text.splitlines(), 1) if row.endswith(("#!", "name: student"))]
    line = marked[-1]
    with pytest.raises(ConfigError) as e:
        load(path)
    message = str(e.value)
    where = f"{path}:{line} stages[1].{key}"
    assert where in message and says in message, message


def test_a_good_distill_section_gives_the_task_settings_only():
    from contract.kinds.distill import DistillOptions

    assert DistillOptions(task="mlm").settings() == {
        "task": "mlm", "alpha": 0.5, "temperature": 2.0, "teacher_placement": "replicate", "keep_layers": None,
        "mask_prob": 0.15}
    assert DistillOptions(task="clm", block_size=64).settings()["block_size"] == 64
    assert "block_size" not in DistillOptions(task="classify").settings()  # data.max_length applies


# ----------------------------------------------------------------- slow: real stages under torchrun

# The teacher learns the task from scratch in a few hundred steps (eval accuracy ~0.55 of 8 classes). Every student
# starts as the teacher with one of its two layers (DistilBERT-style): the same weights whether it is then distilled
# or trained alone on the labels.
TEACHER_BERT = ("{model_type: bert, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
                "intermediate_size: 128, max_position_embeddings: 64}")
DATA = "{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}"
STEPS, LR = 150, 1.0e-3
TEACHER = f"""version: 1
run: {{name: teacher}}
defaults:
  launcher: {{nproc_per_node: 2}}
  seed: 7
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: data/pretrain.txt}}
    sentencepiece: {{vocab_size: 1000}}
  - name: teacher
    kind: classify
    init: {{config: {TEACHER_BERT}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero2}}
    data: {DATA}
    train: {{max_steps: 450, micro_batch_size: 8, lr: 5.0e-4, schedule: constant, log_every: 50}}
"""


def _student(name: str, kind: str, extra: str, *, init: str = "{pretrained: ./student}", zero: int = 2,
             steps: int = STEPS, log_every: int = 10) -> str:
    return f"""
  - name: {name}
    kind: {kind}
    init: {init}
    deepspeed: {{config: zero{zero}}}
    data: {DATA}
    train: {{max_steps: {steps}, micro_batch_size: 8, lr: {LR}, schedule: constant, log_every: {log_every}}}{extra}"""


def _lm(task: str, zero: int, extra: str) -> str:
    data = "data: {train: data/pretrain.txt, eval: data/pretrain.txt, max_length: 32}" if task == "mlm" else \
        "data: {train: data/pretrain.txt, eval: data/pretrain.txt}"
    return f"""
  - name: kd-{task}
    kind: distill
    init: {{pretrained: ./{task}-teacher}}
    teacher: {{pretrained: ./{task}-teacher}}
    deepspeed: {{config: zero{zero}}}
    {data}
    distill: {{task: {task}, alpha: 0.5, temperature: 1.5, {extra}}}
    train: {{max_steps: 3, micro_batch_size: 8, lr: 1.0e-3, log_every: 1}}"""


STUDENTS = """version: 1
run: {name: students}
defaults:
  launcher: {nproc_per_node: 2}
  seed: 7
stages:""" + _student("alone", "classify", "") + _student(
    "distilled", "distill", "\n    teacher: {pretrained: ./teacher}\n    distill: {task: classify, alpha: 0.95, "
    "temperature: 2}") + "".join(
    _student(f"z3-{placement}", "distill", "\n    teacher: {pretrained: ./teacher}\n    distill: {task: classify, "
             f"alpha: 0.5, temperature: 2, teacher_placement: {placement}, keep_layers: [1]}}",
             init="{pretrained: ./teacher}", zero=3, steps=2, log_every=1)
    for placement in ("replicate", "zero3")) + _lm(
    "mlm", 3, "keep_layers: every_other, teacher_placement: zero3") + _lm(
    "clm", 1, "keep_layers: [1], teacher_placement: cpu, block_size: 32") + "\n"


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """The teacher trained by a classify stage; the student made of its layer 1 by keep_layers (saved to ./student,
    so plain classify starts from it too); the students' stages."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    from stages.runtime import pruning

    root = tmp_path_factory.mktemp("distill")
    specs.copy_data(root / "data", labelled_lines=800)
    trained = specs.Stages(root, TEACHER, root / "hf")
    trained.run("tokenizer")
    result = trained.run("teacher")
    shutil.copytree(result["output"]["path"], root / "teacher")
    model = AutoModelForSequenceClassification.from_pretrained(root / "teacher")
    assert pruning.keep_layers(model, [1], "distill.keep_layers") == [1]
    model.save_pretrained(root / "student")
    tokenizer_files = [f for f in (root / "teacher").iterdir() if "token" in f.name or f.suffix == ".model"]
    for f in tokenizer_files:
        shutil.copy(f, root / "student" / f.name)
    _lm_teachers(root, tokenizer_files)
    return {"stages": specs.Stages(root, STUDENTS, root / "hf"), "root": root, "teacher": result,
            "weights": (root / "teacher" / "model.safetensors").read_bytes()}


def _lm_teachers(root: Path, tokenizer_files: list[Path]) -> None:
    """Untrained 2-layer LM teachers with the tokenizer (the logit path needs no trained one): a BERT with its MLM
    head in mlm-teacher/, a GPT-2 in clm-teacher/."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "teacher")
    common = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    for task, auto, config in (
            ("mlm", AutoModelForMaskedLM, AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=2, intermediate_size=64,
                                                                max_position_embeddings=64, **common)),
            ("clm", AutoModelForCausalLM, AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2,
                                                                n_positions=64, eos_token_id=tok.sep_token_id,
                                                                bos_token_id=tok.cls_token_id, **common))):
        auto.from_config(config).save_pretrained(root / f"{task}-teacher")
        for f in tokenizer_files:
            shutil.copy(f, root / f"{task}-teacher" / f.name)


def _predictions(folder: Path) -> list[int]:
    return [json.loads(line)["pred"] for line in (folder / "eval_predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_distilled_student_agrees_with_its_teacher_more_than_one_trained_alone(chain):
    distilled, out = chain["stages"].run_with_output("distilled")
    alone, _ = chain["stages"].run_with_output("alone")
    m = distilled["metrics"]
    assert set(m) >= {"accuracy", "macro_f1", "eval_loss", "teacher_agreement", "teacher_accuracy"}
    # the teacher the stage ran is the trained one, unchanged: its accuracy is the teacher stage's own
    assert m["teacher_accuracy"] == pytest.approx(chain["teacher"]["metrics"]["accuracy"], abs=1e-9)
    teacher = _predictions(Path(chain["teacher"]["output"]["path"]).parent)
    alone_preds = _predictions(chain["stages"].folder("alone"))
    alone_agreement = sum(a == b for a, b in zip(alone_preds, teacher, strict=True)) / len(teacher)
    assert m["teacher_agreement"] >= alone_agreement + 0.05, (m, alone_agreement, alone["metrics"])
    folder = chain["stages"].folder("distilled")
    terms, train = specs.records(folder, "loss_terms"), specs.records(folder, "train")
    assert len(terms) == len(train) == STEPS // 10 and set(terms[-1]["terms"]) == {"task", "kd"}
    for logged, parts in zip(train, terms, strict=True):  # L = (1 − α) L_task + α T² KL, α 0.95, T 2
        task, kd = parts["terms"]["task"], parts["terms"]["kd"]
        assert logged["loss"] == pytest.approx(0.05 * task + 0.95 * 4 * kd, rel=1e-5)
    assert (chain["root"] / "teacher" / "model.safetensors").read_bytes() == chain["weights"]


@pytest.mark.slow
def test_a_zero3_partitioned_teacher_teaches_as_a_replicated_one(chain):
    import torch
    from safetensors.torch import load_file

    results = {p: chain["stages"].run_with_output(f"z3-{p}") for p in ("replicate", "zero3")}
    terms = {p: specs.records(chain["stages"].folder(f"z3-{p}"), "loss_terms") for p in results}
    shares = [line for line in results["zero3"][1].splitlines() if "teacher partitioned by ZeRO-3" in line]
    here, total = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) of its ([\d,]+) values", shares[0])[0])
    assert 0 < here < total, shares  # rank 0 holds a part of the teacher, not all of it
    for step in (0, 1):
        a, b = terms["replicate"][step]["terms"], terms["zero3"][step]["terms"]
        assert a["kd"] == pytest.approx(b["kd"], abs=1e-5) and a["task"] == pytest.approx(b["task"], abs=1e-5)
        assert a["kd"] > 0
    # the student kept layer 1 of the teacher's two: a one-layer model in final/
    final = Path(results["zero3"][0]["output"]["path"])
    assert json.loads((final / "config.json").read_text())["num_hidden_layers"] == 1
    student = load_file(str(final / "model.safetensors"))
    assert "bert.encoder.layer.0.output.dense.weight" in student
    assert not any(k.startswith("bert.encoder.layer.1.") for k in student)
    assert all(torch.isfinite(v).all() for v in student.values())
    assert (chain["root"] / "teacher" / "model.safetensors").read_bytes() == chain["weights"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_language_model_logits_distil_too(chain, task):
    """mlm (ZeRO-3 student, ZeRO-3 teacher) and clm (ZeRO-1 student, teacher on the CPU): the student of every other
    layer (mlm) or layer 1 (clm) trains, its loss is the formula of its logged terms, eval has the LM metrics."""
    result, _ = chain["stages"].run_with_output(f"kd-{task}")
    folder = chain["stages"].folder(f"kd-{task}")
    for logged, parts in zip(specs.records(folder, "train"), specs.records(folder, "loss_terms"), strict=True):
        task_loss, kd = parts["terms"]["task"], parts["terms"]["kd"]
        assert kd > 0 and logged["loss"] == pytest.approx(0.5 * task_loss + 0.5 * 1.5**2 * kd, rel=1e-5)
    m = result["metrics"]
    assert set(m) == {"eval_loss", "perplexity", "teacher_agreement"} and 0 < m["teacher_agreement"] <= 1
    config = json.loads(Path(result["output"]["path"], "config.json").read_text())
    assert config["num_hidden_layers" if task == "mlm" else "n_layer"] == 1
