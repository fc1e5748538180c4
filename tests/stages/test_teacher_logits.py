"""Offline distillation (kind `teacher_logits`, and distill's `teacher_logits` input): the top-k KL against the full
one and a hand computation, how stored rows line up with a batch, the manifest's checks; and real stages under
torchrun (2 gloo ranks): the stored logits are the teacher's, and an offline student takes the same first step as an
online one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.stages import specs

# ----------------------------------------------------------------- fast: the loss

Z_STUDENT = [[1.0, -0.5, 2.0, 0.1], [0.3, 0.2, -1.0, 0.7]]
Z_TEACHER = [[2.0, 0.0, 1.0, -0.4], [-1.0, 1.5, 0.5, 0.2]]


def _top_k_by_hand(student: list[list[float]], teacher: list[list[float]], k: int, t: float) -> float:
    """Σ_{i ∈ top-k of the teacher} p_T,i (log p_T,i − log p_S,i), p_T the softmax of the k values / T, p_S the
    softmax of all the student's logits / T; averaged over rows. Plain Python."""
    total = 0.0
    for s, q in zip(student, teacher, strict=True):
        top = sorted(range(len(q)), key=lambda i: -q[i])[:k]
        z_t = sum(math.exp(q[i] / t) for i in top)
        z_s = sum(math.exp(v / t) for v in s)
        for i in top:
            p_t = math.exp(q[i] / t) / z_t
            total += p_t * (math.log(p_t) - math.log(math.exp(s[i] / t) / z_s))
    return total / len(student)


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_top_k_with_every_class_is_the_full_kl(t):
    import torch

    from stages.distill import distill_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    top = teacher.topk(10, dim=-1)  # every class, in another order than the ids
    task = torch.tensor(0.7)
    full_loss, full_kd = distill_loss(student, teacher, task, 0.4, t)
    loss, kd = distill_loss(student, (top.values, top.indices), task, 0.4, t)
    assert float(kd) == pytest.approx(float(full_kd), rel=1e-6, abs=1e-7)
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-6)
    # and the same gradient on the student's logits
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    distill_loss(a, teacher, task, 1.0, t)[0].backward()
    distill_loss(b, (top.values, top.indices), task, 1.0, t)[0].backward()
    assert a.grad is not None and b.grad is not None
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_top_k_kl_is_the_formula(k, t):
    import torch

    from stages.distill import distill_loss

    teacher = torch.tensor(Z_TEACHER)
    top = teacher.topk(k, dim=-1)
    loss, kd = distill_loss(torch.tensor(Z_STUDENT), (top.values, top.indices), torch.tensor(0.5), 0.3, t)
    want = _top_k_by_hand(Z_STUDENT, Z_TEACHER, k, t)
    assert float(kd) == pytest.approx(want, rel=1e-6)
    assert float(loss) == pytest.approx(0.7 * 0.5 + 0.3 * t * t * want, rel=1e-6)
    if k == 1:  # one stored class: p_T is 1 there, the KL is the student's −log p_S of the teacher's top class
        assert float(kd) == pytest.approx(float(-torch.log_softmax(torch.tensor(Z_STUDENT) / t, -1)
                                                .gather(-1, top.indices).mean()), rel=1e-6)


def test_stored_rows_line_up_with_the_batch():
    """classify: row i is example i; clm: block b's rows are b × (block_size − 1) … in order, and a batch cut to
    fewer tokens (a curriculum's max_length) takes each block's first predictions."""
    import torch

    from stages.runtime.teacher import Stored

    values = torch.arange(5 * 3 * 2, dtype=torch.float).view(15, 2)  # 5 blocks of 4 tokens: 3 rows each, k 2
    stored = Stored({}, {"train.values": values, "train.indices": values.long()}, 3, torch.device("cpu"))
    v, i = stored.rows("train", [4, 1])
    assert v.tolist() == values[[12, 13, 14, 3, 4, 5]].tolist() and torch.equal(i, v.long())
    v, _ = stored.rows("train", [4, 1], tokens=3)
    assert v.tolist() == values[[12, 13, 3, 4]].tolist()
    assert not stored.has("eval")
    one = Stored({}, {"eval.values": values, "eval.indices": values.long()}, 1, torch.device("cpu"))
    assert one.rows("eval", [7, 0])[0].tolist() == values[[7, 0]].tolist()


# ----------------------------------------------------------------- fast: the manifest

MANIFEST_HEAD = """version: 1
run: {name: x}
stages:
  - name: tok
    kind: tokenizer
    data: {train: train.txt}
    sentencepiece: {vocab_size: 100}
  - name: teacher
    kind: classify
    init: {config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}}
    tokenizer: {from: tok}
    data: {train: data.jsonl}
    train: {max_steps: 1}
  - name: logits
    kind: teacher_logits
    teacher: {from: teacher}
    data: {train: data.jsonl}
"""
STUDENT = """  - name: student
    kind: distill
    init: {from: teacher}
    train: {max_steps: 1}
"""
CLASSIFY = "    teacher_logits: {task: classify}\n"
OFFLINE = "    teacher_logits: {from: logits}  #!\n"


@pytest.mark.parametrize(("producer", "lines", "key", "says"), [
    ("    teacher_logits: {task: mlm}  #!\n", "", "stages[2].teacher_logits.task",
     "mlm cannot be stored: its rows are drawn anew every epoch"),
    ("    teacher_logits: {task: clm}  #!\n", "", "stages[2].teacher_logits.top_k", "task clm needs top_k"),
    ("    teacher_logits: {task: classify, block_size: 64}  #!\n", "", "stages[2].teacher_logits.block_size",
     "block_size is for task clm"),
    ("    teacher_logits: {task: classify, top_k: 0}  #!\n", "", "stages[2].teacher_logits.top_k",
     "greater than or equal to 1"),
    (CLASSIFY, "    data: {train: data.jsonl}\n    distill: {task: classify}\n", "stages[3].teacher",
     "required: give teacher (a model, run at every step) or teacher_logits"),
    (CLASSIFY, "    data: {train: data.jsonl}\n    teacher: {from: teacher}\n" + OFFLINE
     + "    distill: {task: classify}\n", "stages[3].teacher_logits", "give teacher or teacher_logits, not both"),
    (CLASSIFY, "    data: {train: data.jsonl}\n" + OFFLINE + "    distill: {task: mlm}\n", "stages[3].teacher_logits",
     "distill.task mlm cannot read stored logits"),
    (CLASSIFY, "    data: {train: data.jsonl}\n" + OFFLINE
     + "    distill: {task: classify, teacher_placement: zero3}  #!\n", "stages[3].distill.teacher_placement",
     "with teacher_logits no teacher runs"),
    (CLASSIFY, "    data: {train: data.jsonl}\n    teacher_logits: {from: teacher}  #!\n"
     "    distill: {task: classify}\n",
     "stages[3].teacher_logits.from", "stage 'teacher' is a classify stage and gives no teacher_logits"),
    (CLASSIFY, "    data: {train: data.jsonl}\n    teacher_logits: {from: nobody}  #!\n    distill: {task: classify}\n",
     "stages[3].teacher_logits.from", "unknown earlier stage 'nobody'"),
    (CLASSIFY, "    data: {train: other.jsonl}\n" + OFFLINE + "    distill: {task: classify}\n",
     "stages[3].teacher_logits.from", "stage 'logits' scored its own training data (data.jsonl), but this stage "
     "trains on other.jsonl; the logits are per row of the same training data"),
    (CLASSIFY, "    data: {train: data.jsonl, max_length: 64}\n" + OFFLINE + "    distill: {task: classify}\n",
     "stages[3].teacher_logits.from", "made its rows with max_length 128, but this stage's have max_length 64"),
    ("    teacher_logits: {task: clm, top_k: 8, block_size: 32}\n", "    data: {train: data.jsonl}\n" + OFFLINE
     + "    distill: {task: clm, block_size: 64}\n", "stages[3].teacher_logits.from",
     "made its rows with block_size 32, but this stage's have block_size 64"),
    (CLASSIFY, "    data: {train: data.jsonl}\n" + OFFLINE + "    distill: {task: clm}\n",
     "stages[3].teacher_logits.from", "made its rows with task classify, but this stage's have task clm"),
], ids=["mlm-refused", "clm-without-top-k", "block-size-for-classify", "top-k-zero", "neither-teacher-nor-logits",
        "both-teacher-and-logits", "offline-mlm", "offline-with-placement", "logits-from-a-classify-stage",
        "logits-from-nobody", "other-training-data", "other-max-length", "other-block-size", "other-task"])
def test_bad_offline_settings_are_refused_naming_file_line_and_key(tmp_path, producer, lines, key, says):
    from launcher.errors import ConfigError
    from launcher.manifest import load
    from launcher.resolve import resolve

    (tmp_path / "train.txt").write_text("a b c\n")
    (tmp_path / "data.jsonl").write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "other.jsonl").write_text('{"text": "b", "label": "x"}\n')
    text = MANIFEST_HEAD + producer + STUDENT + lines
    path = tmp_path / "m.yaml"
    path.write_text(text)
    marked = [i for i, row in enumerate(text.splitlines(), 1) if row.endswith("#!")]
    owner = "name: logits" if key.startswith("stages[2]") else "name: student"
    line = marked[-1] if marked else next(i for i, row in enumerate(text.splitlines(), 1) if row.endswith(owner))
    with pytest.raises(ConfigError) as e:
        resolve(load(path))
    message = str(e.value)
    where = f"{path}:{line} {key}"
    assert where in message and says in message, message


def test_good_offline_manifest_resolves_with_the_input(tmp_path):
    """teacher_logits is an input like any other: the producer is upstream, and the spec names it."""
    from launcher.manifest import load
    from launcher.resolve import resolve

    (tmp_path / "train.txt").write_text("a b c\n")
    (tmp_path / "data.jsonl").write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "m.yaml").write_text(MANIFEST_HEAD + CLASSIFY + STUDENT + "    data: {train: data.jsonl}\n"
                                     "    teacher_logits: {from: logits}\n    distill: {task: classify}\n")
    stages = {r.name: r for r in resolve(load(tmp_path / "m.yaml"))}
    assert stages["logits"].base["options"] == {"task": "classify", "top_k": None, "batch_size": 16}
    assert stages["logits"].base["train"] is None and stages["logits"].upstream == ("teacher",)
    assert stages["logits"].base["inputs"]["tokenizer"]["stage"] == "teacher"  # the teacher's own tokenizer
    student = stages["student"]
    assert student.upstream == ("teacher", "logits")
    assert student.base["inputs"]["teacher_logits"] == {"source": "stage", "stage": "logits", "path": None,
                                                        "digest": None, "config": None}
    assert "teacher" not in student.base["inputs"]


# ----------------------------------------------------------------- slow: real stages under torchrun

DATA = "{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}"
STUDENT_SETTINGS = f"""
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{pretrained: ./tok}}
    deepspeed: {{config: zero2}}
    data: {DATA}
    train: {{max_steps: 2, micro_batch_size: 8, lr: 1.0e-3, schedule: constant, log_every: 1}}"""
DISTILL = "    distill: {task: classify, alpha: 0.5, temperature: 2}"
OFFLINE_RUN = f"""version: 1
run: {{name: offline}}
defaults:
  launcher: {{nproc_per_node: 2}}
  seed: 7
stages:
  - name: teacher
    kind: classify
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{pretrained: ./tok}}
    deepspeed: {{config: zero2}}
    data: {DATA}
    train: {{max_steps: 4, micro_batch_size: 8, lr: 5.0e-3, schedule: constant}}
  - name: logits
    kind: teacher_logits
    teacher: {{from: teacher}}
    data: {DATA}
    teacher_logits: {{task: classify, batch_size: 16}}
  - name: offline
    kind: distill{STUDENT_SETTINGS}
    teacher_logits: {{from: logits}}
{DISTILL}
  - name: online
    kind: distill{STUDENT_SETTINGS}
    teacher: {{from: teacher}}
{DISTILL}
"""


def _wordpiece(folder: Path, corpus: Path) -> None:
    """A small WordPiece tokenizer trained on `corpus`, saved as a BERT-style fast tokenizer (in-process: no stage)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer()
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.train([str(corpus)], trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(t, core.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)


@pytest.mark.slow
def test_offline_distillation_takes_the_online_step(tmp_path):
    """A tiny classify teacher (4 steps); its logits of every row stored (top_k null: all 8 classes); two students
    alike (built from one config with one seed, the same batches), one reading the stored logits, one running the
    teacher: the stored values are the teacher's logits, and step 1's loss terms are the same."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    specs.copy_data(tmp_path / "data", labelled_lines=96)
    _wordpiece(tmp_path / "tok", tmp_path / "data" / "pretrain.txt")
    stages = specs.Stages(tmp_path, OFFLINE_RUN, tmp_path / "hf")
    teacher = stages.run("teacher")
    produced = stages.run("logits")

    # the artefact: what the teacher's final/ gives, row by row
    final = Path(produced["output"]["path"])
    meta = json.loads((final / "teacher_logits.json").read_text())
    stored = load_file(str(final / "teacher_logits.safetensors"))
    assert meta["task"] == "classify" and meta["top_k"] == meta["classes"] == 8 and meta["top_k_given"] is None
    assert meta["examples"] == {"train": 96, "eval": 48} and meta["teacher"]["digest"] == teacher["output"]["digest"]
    # no place on disk enters the digest: the same logits made in another run folder hand on the same digest
    assert not [p.name for p in final.iterdir() if p.suffix == ".json" and str(tmp_path) in p.read_text()]
    assert stored["train.values"].shape == stored["train.indices"].shape == (96, 8)
    assert stored["train.values"].dtype == torch.float32 and stored["train.indices"].dtype == torch.int64
    model = AutoModelForSequenceClassification.from_pretrained(teacher["output"]["path"]).eval()
    tok = AutoTokenizer.from_pretrained(teacher["output"]["path"])
    worst = 0.0
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (tmp_path / "data" / f"supersense_{split}.jsonl").read_text().splitlines()]
        values, indices = stored[f"{split}.values"], stored[f"{split}.indices"]
        assert (values[:, :-1] >= values[:, 1:]).all()  # largest first
        full = torch.zeros_like(values).scatter(1, indices, values)
        with torch.no_grad():
            for i, row in enumerate(rows):
                logits = model(**tok(row["text"], truncation=True, max_length=32, return_tensors="pt")).logits[0]
                worst = max(worst, float((logits - full[i]).abs().max()))
    print("largest difference, stored vs recomputed teacher logits:", worst)
    assert worst < 1e-5, worst
    labels = [meta["labels"].index(json.loads(line)["label"]) for line in
              (tmp_path / "data" / "supersense_eval.jsonl").read_text().splitlines()]
    assert produced["metrics"]["accuracy"] == pytest.approx(
        float((stored["eval.indices"][:, 0] == torch.tensor(labels)).double().mean()))
    assert produced["metrics"]["accuracy"] == pytest.approx(teacher["metrics"]["accuracy"], abs=1e-9)

    offline, online = stages.run("offline"), stages.run("online")
    terms = {name: specs.records(stages.folder(name), "loss_terms") for name in ("offline", "online")}
    first = terms["offline"][0]["terms"], terms["online"][0]["terms"]
    print("step 1 offline", first[0], "online", first[1])
    assert first[0]["task"] == first[1]["task"]  # the same student, batches and dropout: bit for bit
    # The KL is a sum of p_T · (log p_T − log p_S) over float32 log-probabilities of size ~2 (8 classes), each
    # rounded to ~1e-7; the stored logits come from other batches (other padding) and are summed in top-k order, so
    # the two KLs agree to that rounding, absolutely (~3e-8 here, on a KL of ~5e-4), not relatively.
    assert first[0]["kd"] > 0 and first[0]["kd"] == pytest.approx(first[1]["kd"], rel=0, abs=5e-7)
    second = terms["offline"][1]["terms"], terms["online"][1]["terms"]
    print("step 2 offline", second[0], "online", second[1])
    assert second[0]["kd"] == pytest.approx(second[1]["kd"], rel=0, abs=5e-7)
    assert second[0]["task"] == pytest.approx(second[1]["task"], rel=1e-5)
    # eval: the teacher's side from the stored eval rows is the online teacher's
    for key in ("teacher_agreement", "teacher_accuracy"):
        assert offline["metrics"][key] == pytest.approx(online["metrics"][key], abs=1e-9), key
    assert offline["metrics"]["accuracy"] == pytest.approx(online["metrics"]["accuracy"], abs=1e-9)


CLM_RUN = """version: 1
run: {name: clm}
defaults:
  seed: 7
stages:
  - name: logits
    kind: teacher_logits
    teacher: {pretrained: ./gpt2}
    data: {train: data/pretrain.txt, eval: data/pretrain.txt}
    teacher_logits: {task: clm, top_k: 4, block_size: 16}
  - name: student
    kind: distill
    init: {pretrained: ./gpt2}
    teacher_logits: {from: logits}
    data: {train: data/pretrain.txt, eval: data/pretrain.txt}
    distill: {task: clm, block_size: 16}
    train: {max_steps: 1}
"""


@pytest.mark.slow
def test_clm_rows_are_every_predicted_token_of_each_block(tmp_path, monkeypatch):
    """The stage program in this process (one rank, no torchrun): a tiny GPT-2's top 4 of every predicted token of
    every packed block, block by block; the distill stage's checks accept them for its own data and refuse another
    block size or another number of examples, naming the file."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from stages import teacher_logits
    from stages.runtime import data, packing, records, teacher
    from stages.runtime.dist import Dist
    from stages.runtime.spec import SpecError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    specs.copy_data(tmp_path / "data", pretrain_lines=60)
    _wordpiece(tmp_path / "gpt2", tmp_path / "data" / "pretrain.txt")
    tok = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=len(tok), eos_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id))
    model.save_pretrained(tmp_path / "gpt2")
    stages = specs.Stages(tmp_path, CLM_RUN, tmp_path / "hf")
    spec = stages.spec("logits")
    specs.write_spec(spec)
    records.configure(spec.stage_dir)  # as entry.run does
    assert teacher_logits.main(spec, Dist(0, 0, 1, torch.device("cpu"))) == 0
    result = json.loads(Path(spec.stage_dir, "result.json").read_text())
    final = Path(result["output"]["path"])
    meta = json.loads((final / "teacher_logits.json").read_text())
    stored = load_file(str(final / "teacher_logits.safetensors"))
    blocks = packing.pack(spec.data, spec.cache_dir, data.tokenizer_digest(spec), data.load_raw(spec), tok,
                          packing.end_of_document(tok), 16)["train"].blocks
    n = len(blocks)
    assert meta["examples"]["train"] == n and meta["block_size"] == 16 and meta["classes"] == len(tok)
    assert stored["train.values"].shape == (n * 15, 4)
    with torch.no_grad():
        want = model.eval()(input_ids=torch.tensor(blocks["input_ids"])).logits[:, :-1].topk(4, dim=-1)
    assert torch.allclose(stored["train.values"], want.values.reshape(-1, 4), atol=1e-5)
    assert torch.equal(stored["train.indices"], want.indices.reshape(-1, 4))
    assert result["metrics"]["accuracy"] == pytest.approx(float(
        (want.indices[..., 0] == torch.tensor(blocks["input_ids"])[:, 1:]).double().mean()))

    student = stages.spec("student", outputs={"logits": result["output"]})
    got = teacher.load_stored(student, "clm", block_size=16, examples={"train": n, "eval": n},
                              device=torch.device("cpu"))
    assert got.has("eval") and torch.equal(got.rows("train", [1])[1], want.indices[1])
    with pytest.raises(SpecError, match=r"inputs.teacher_logits: stage logits: .*teacher_logits.json: its rows were "
                       "made with block_size 16, this stage's is 32"):
        teacher.load_stored(student, "clm", block_size=32, examples={"train": n, "eval": n}, device=torch.device("cpu"))
    with pytest.raises(SpecError, match=rf"holds the logits of {n} examples of other training data than this stage's "
                       f"{n + 1}"):
        teacher.load_stored(student, "clm", block_size=16, examples={"train": n + 1, "eval": n},
                            device=torch.device("cpu"))
    with pytest.raises(SpecError, match="holds logits of task clm, this stage's distill.task is classify"):
        teacher.load_stored(student, "classify", block_size=None, examples={"train": n, "eval": n},
                            device=torch.device("cpu"))
