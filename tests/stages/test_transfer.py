"""Distillation on a transfer set (distill's `transfer:`): rows without labels, trained on the teacher's softened
logits alone, mixed with the labelled rows at distill.transfer_share of the micro-batches.

Fast: what validate says of rows that need labels and of a transfer set it cannot use. Slow (2 gloo ranks,
DeepSpeed on CPU, a tiny random teacher: the logit path needs no trained one): the transfer rows reach the loss
and move the student where the labelled rows alone would not; a killed and resumed stage ends bitwise equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stages import specs

# ----------------------------------------------------------------- fast: validate

MANIFEST = """version: 1
run: {name: x}
stages:
  - name: teacher
    kind: classify
    init: {pretrained: bert-base-uncased}
    data: {train: labelled.jsonl}
    train: {max_steps: 1}
  - name: student
    kind: distill
    init: {from: teacher}
    teacher: {from: teacher}
    data: {train: DATA}
    distill: {task: classify, alpha: 1.0DISTILL}
    train: {max_steps: 4}
"""


def _manifest(tmp_path: Path, data: str = "labelled.jsonl", distill: str = "", extra: str = "") -> Path:
    (tmp_path / "labelled.jsonl").write_text('{"text": "a small dog", "label": "animal"}\n'
                                             '{"text": "an oak", "label": "plant"}\n')
    (tmp_path / "unlabelled.jsonl").write_text('{"text": "a cat"}\n{"text": "a pine"}\n')
    (tmp_path / "glosses.txt").write_text("a large cat\na tall tree\n")
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST.replace("DATA", data).replace("DISTILL", distill) + extra)
    return path


def _refused(path: Path) -> str:
    from launcher.errors import ConfigError
    from launcher.manifest import load
    from launcher.resolve import resolve

    with pytest.raises(ConfigError) as e:
        resolve(load(path))
    return str(e.value)


@pytest.mark.parametrize(("data", "says"), [
    ("unlabelled.jsonl", "unlabelled.jsonl: line 1: no field 'label' (fields: text); set data.label_field; rows "
     "without labels go in transfer: (the teacher's logits are their only targets)"),
    ("glosses.txt", "glosses.txt: a text file has no column 'label': every row of a classifier's data needs a "
     "label; rows without labels go in transfer:"),
])
def test_labelled_rows_without_a_label_are_refused_naming_the_file_and_where_they_go(tmp_path, data, says):
    path = _manifest(tmp_path, data)
    message = _refused(path)
    line = MANIFEST.splitlines().index("    data: {train: DATA}") + 1
    assert f"{path}:{line} stages[1].data.train: {tmp_path / data}" in message and says in message, message


@pytest.mark.parametrize("transfer", ["glosses.txt", "unlabelled.jsonl"])
def test_a_transfer_set_without_labels_passes_and_is_a_section_of_the_spec(tmp_path, transfer):
    from launcher.manifest import load
    from launcher.resolve import resolve

    path = _manifest(tmp_path, distill=", transfer_share: 0.5", extra=f"    transfer: {{train: {transfer}}}\n")
    student = next(r for r in resolve(load(path)) if r.name == "student")
    section = student.base["sections"]["transfer"]
    assert section["train_files"] == [str(tmp_path / transfer)] and section["eval_files"] == []
    assert student.base["options"]["transfer_share"] == 0.5
    # a stage without a transfer set has no such option: its fingerprint is what it was before transfer existed
    (tmp_path / "plain").mkdir()
    plain = next(r for r in resolve(load(_manifest(tmp_path / "plain"))) if r.name == "student")
    assert "transfer_share" not in plain.base["options"] and plain.base["sections"] == {}


TEACHER_LOGITS_STAGE = """  - name: logits
    kind: teacher_logits
    teacher: {from: teacher}
    data: {train: labelled.jsonl}
    teacher_logits: {task: classify}
"""


@pytest.mark.parametrize(("edit", "key", "says"), [
    ((", transfer_share: 0.5", ""), "distill.transfer_share", "no transfer set to draw from"),
    (("", "    transfer: {train: glosses.txt}\n"), "distill.transfer_share", "required with transfer"),
    ((", transfer_share: 0", "    transfer: {train: glosses.txt}\n"), "distill.transfer_share", "greater than 0"),
    ((", transfer_share: 1.5", "    transfer: {train: glosses.txt}\n"), "distill.transfer_share",
     "less than or equal to 1"),
    ((", transfer_share: 0.5", "    transfer: {train: glosses.txt, eval: glosses.txt}\n"), "transfer.eval",
     "never scored"),
    ((", transfer_share: 0.5", "    transfer: {train: unlabelled.jsonl, labels: [a, b]}\n"), "transfer.labels",
     "no labels"),
    ((", transfer_share: 0.5", "    transfer: {train: glosses.txt}\n    curriculum: {phases: [{}]}\n"),
     "curriculum", "leave out curriculum"),
])
def test_a_transfer_set_the_stage_cannot_use_is_refused_naming_the_key(tmp_path, edit, key, says):
    from launcher.errors import ConfigError
    from launcher.manifest import load

    path = _manifest(tmp_path, distill=edit[0], extra=edit[1])
    with pytest.raises(ConfigError) as e:
        load(path)
    assert f"stages[1].{key}" in str(e.value) and says in str(e.value), str(e.value)


def test_transfer_needs_max_steps_an_online_teacher_and_a_head_that_reads_text(tmp_path):
    from launcher.errors import ConfigError
    from launcher.manifest import load

    transfer = "    transfer: {train: glosses.txt}\n"
    cases = [
        (MANIFEST.replace("train: {max_steps: 4}", "train: {epochs: 1}"), "stages[1].train.epochs",
         "give train.max_steps"),
        (MANIFEST.replace("    teacher: {from: teacher}\n    data: {train: DATA}",
                          "    teacher_logits: {from: logits}\n    data: {train: DATA}").replace(
            "  - name: student", TEACHER_LOGITS_STAGE + "  - name: student"),
         "stages[2].transfer", "give teacher (run at every step) instead of teacher_logits"),
        (MANIFEST.replace("task: classify, alpha: 1.0", "task: sft, alpha: 1.0"), "stages[1].transfer",
         "task sft cannot read rows without labels"),
    ]
    for text, key, says in cases:
        _manifest(tmp_path)
        path = tmp_path / "m.yaml"
        path.write_text(text.replace("DATA", "labelled.jsonl").replace("DISTILL", ", transfer_share: 0.5")
                        + transfer)
        with pytest.raises(ConfigError) as e:
            load(path)
        assert key in str(e.value) and says in str(e.value), str(e.value)


# ----------------------------------------------------------------- slow: real stages under torchrun

LABELS = ["animal", "artifact", "body", "food", "location", "person", "plant", "substance"]
DATA = "{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}"
TRANSFER = "{train: data/pretrain.txt, max_length: 32}"
STEPS, EVERY = 12, 5


def _stage(name: str, task: str, share: float, alpha: float, *, zero: int = 2, steps: int = STEPS,
           checkpoint: int | None = None) -> str:
    return f"""
  - name: {name}
    kind: distill
    init: {{pretrained: ./{task}-teacher}}
    teacher: {{pretrained: ./{task}-teacher}}
    deepspeed: {{config: zero{zero}}}
    data: {DATA}
    transfer: {TRANSFER}
    distill: {{task: {task}, alpha: {alpha}, temperature: 2, keep_layers: [1], transfer_share: {share}}}
    train: {{max_steps: {steps}, micro_batch_size: 4, grad_accum: 2, lr: 1.0e-3, schedule: constant, log_every: 2}}
    checkpoint: {{every_steps: {"null" if checkpoint is None else checkpoint}}}"""


STUDENTS = """version: 1
run: {name: students}
defaults:
  launcher: {nproc_per_node: 2}
  seed: 7
stages:""" + "".join(_stage(f"only-{task}", task, 1.0, 0.0) for task in ("classify", "mlm")) + "".join(
    _stage(f"mixed-{role}", "classify", 0.5, 0.5, zero=3, checkpoint=EVERY) for role in ("ref", "kill")) + "\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Random 2-layer teachers (a classifier of the 8 supersenses, a masked LM) with the tokenizer a tokenizer stage
    trained; the students' stages."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("transfer")
    specs.copy_data(root / "data")
    made = specs.Stages(root, specs.head("tok") + "\n", root / "hf").run("tokenizer")
    folder = Path(made["output"]["path"])
    tok = AutoTokenizer.from_pretrained(folder)
    bert = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 64, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    for task, auto, extra in (
            ("classify", AutoModelForSequenceClassification,
             {"num_labels": 8, "id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}),
            ("mlm", AutoModelForMaskedLM, {})):
        auto.from_config(AutoConfig.for_model("bert", **bert, **extra)).save_pretrained(root / f"{task}-teacher")
        for f in folder.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.startswith("model"):
                shutil.copy(f, root / f"{task}-teacher" / f.name)
    return {"root": root, "stages": specs.Stages(root, STUDENTS, root / "hf")}


def _steps(folder: Path, event: str, key: str) -> dict[int, object]:
    """Per step, `key` of the records of `event` that cover a window of steps (mixing: tasks; else the value)."""
    out: dict[int, object] = {}
    for record in specs.records(folder, event):
        if event == "mixing":
            first = record["step"] - len(record["tasks"]) + 1
            out |= {first + k: tasks for k, tasks in enumerate(record["tasks"])}
        else:
            out[record["step"]] = record[key]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", pytest.param("mlm", marks=pytest.mark.full)])
def test_at_share_1_only_the_transfer_rows_train_the_student_on_the_teachers_logits(work, task):
    """Every micro-batch is a transfer row's; its loss is T² · KL alone (α 0 would leave only the labels'
    cross-entropy, which is never computed), and it moves the student."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from stages.runtime import pruning

    result = work["stages"].run(f"only-{task}")
    folder = work["stages"].folder(f"only-{task}")
    drawn = specs.records(folder, "mixing")[-1]["drawn"]
    assert drawn == {"data": 0, "transfer": STEPS * 2}, drawn
    terms, train = specs.records(folder, "loss_terms"), specs.records(folder, "train")
    assert len(terms) == len(train) == STEPS // 2
    for logged, parts in zip(train, terms, strict=True):
        assert set(parts["terms"]) == {"transfer"} and parts["terms"]["transfer"] > 0
        assert logged["loss"] == pytest.approx(2**2 * parts["terms"]["transfer"], rel=1e-5)
    assert "teacher_agreement" in result["metrics"]  # eval is of the labelled eval rows, as ever
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForMaskedLM
    start = auto.from_pretrained(work["root"] / f"{task}-teacher")
    pruning.keep_layers(start, [1], "distill.keep_layers")
    before = start.state_dict()
    after = load_file(str(Path(result["output"]["path"], "model.safetensors")))
    assert AutoConfig.from_pretrained(result["output"]["path"]).num_hidden_layers == 1
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert any(".encoder.layer.0." in k for k in moved), moved


@pytest.mark.slow
def test_killed_and_resumed_with_a_transfer_set_draws_alike_and_ends_bitwise_equal(work):
    """ZeRO-3, half the micro-batches from the transfer set: a stage killed after its first checkpoint and resumed
    draws the same source for every micro-batch, logs the same loss terms, and ends with the same weights."""
    import torch
    from safetensors.torch import load_file

    stages = work["stages"]
    ref = stages.run("mixed-ref")
    spec = stages.spec("mixed-kill")
    stages.kill_after_first_checkpoint(spec)
    result = stages.run("mixed-kill", spec)
    folder, ref_dir = stages.folder("mixed-kill"), stages.folder("mixed-ref")
    start = specs.records(folder, "start")
    assert len(start) == 2 and start[1]["step"] > 0, start  # resumed, not started over
    want, got = _steps(ref_dir, "mixing", "tasks"), _steps(folder, "mixing", "tasks")
    assert sorted(want) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in got) and set(got) >= set(range(start[1]["step"] + 1, STEPS + 1))
    drawn = specs.records(ref_dir, "mixing")[-1]["drawn"]
    assert drawn["data"] > 0 and drawn["transfer"] > 0 and sum(drawn.values()) == STEPS * 2
    want_terms, got_terms = _steps(ref_dir, "loss_terms", "terms"), _steps(folder, "loss_terms", "terms")
    assert any("transfer" in t for t in want_terms.values())
    # a window of log_every steps that the kill cut in two differs; every later one is the same
    assert all(got_terms[s] == want_terms[s] for s in got_terms if s > start[1]["step"] + 1)
    assert result["metrics"] == ref["metrics"] and result["samples"] == ref["samples"]
    a = load_file(str(Path(result["output"]["path"], "model.safetensors")))
    b = load_file(str(Path(ref["output"]["path"], "model.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
