"""Instruction tuning (`sft`): which tokens train and how the loss weighs them, packed rows against unpacked ones,
greedy generation, the length-grouped sampler and template checks at validate (fast, in-process on tiny models);
then the stage run for real under torchrun (slow): 2 gloo ranks at ZeRO-3, killed and resumed bitwise, final/
loading with its chat template, the generations file, and packing refused for a model type that cannot keep packed
examples apart.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_in_process
from tests.stages import specs

WORDS = ["what", "is", "a", "cat", "dog", "bird", "fish", "red", "blue", "green", "animal", "colour", "the", "of",
         "name", "say", "hello", "hi", "and", "user:", "assistant:", "system:", "?", "answer", "in", "one", "word", ">"]
PAIRS = [("what is a cat ?", "animal"), ("what is red ?", "colour"), ("name the colour of a bird", "blue"),
         ("say hello", "hi"), ("what is a fish and what is a dog ?", "animal and animal"), ("what is blue ?", "colour")]
CHAT = [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": "what is a cat ?"},
        {"role": "assistant", "content": "animal"}, {"role": "user", "content": "and red ?"},
        {"role": "assistant", "content": "colour"}]


def word_tokenizer(folder: Path):
    """A word-level tokenizer with baton's special tokens ([SEP] ends documents; no EOS, no chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(folder)
    return tok


def load_head(root: Path, rows: list[dict[str, Any]], *, max_length: int = 64, **options: Any):
    """The sft head over `rows` (train and eval alike), read as the stage reads them."""
    from contract.spec import DataSpec
    from stages.runtime import heads

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"rows-{len(list(root.glob('rows-*')))}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = options.get("messages_field") or options.get("prompt_field", "prompt")
    data = DataSpec(train_files=[str(path)], eval_files=[str(path)], format="json", hub=None, text_field=text,
                    text_pair_field=None, label_field="label", labels=None, max_length=max_length, digests={})
    tok = word_tokenizer(root / "tokenizer")
    return heads.load("sft", heads.Source(data=data, tokenizer=tok, tokenizer_digest="test", cache_dir=str(root / "c"),
                                          seed=1, options=options)), tok


def pairs(n: int | None = None) -> list[dict[str, str]]:
    return [{"prompt": p, "completion": c} for p, c in PAIRS[:n]]


def tiny(family: str, vocab: int, **extra: Any):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = (dict(n_embd=32, n_layer=2, n_head=2, n_positions=64) if family == "gpt2" else
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, head_dim=16))
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                  **shape, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


# ----------------------------------------------------------------- which tokens train, and how much


def test_exactly_the_answer_tokens_train(tmp_path):
    head, tok = load_head(tmp_path, pairs())
    sep = tok.sep_token_id
    for i, (prompt, completion) in enumerate(PAIRS):
        row = head.splits["train"][i]
        words = tok.convert_ids_to_tokens(row["input_ids"])
        # the default template: "user: <prompt>[SEP]assistant: <completion>[SEP]", [SEP] as the end token
        assert words == ["user:", *prompt.split(), "[SEP]", "assistant:", *completion.split(), "[SEP]"]
        answer = tok.convert_tokens_to_ids(completion.split()) + [sep]
        assert [t for t in row["labels"] if t != -100] == answer  # the answer and its end token, nothing else
        assert row["labels"][-len(answer):] == answer and row["prompt_length"] == len(words) - len(answer)
        assert row["reference"] == completion
    batch = head.batch("train", [(i, 0) for i in range(len(PAIRS))])
    want = [t for _, c in PAIRS for t in tok.convert_tokens_to_ids(c.split()) + [sep]]
    assert head.targets(batch).tolist() == want
    assert head.trained("train", range(len(PAIRS)), None) == len(want)
    assert head.examples(batch).tolist() == [i for i, (_, c) in enumerate(PAIRS) for _ in range(len(c.split()) + 1)]

    everything, _ = load_head(tmp_path / "all", pairs(), train_on_prompt=True)
    row = everything.splits["train"][0]
    assert row["labels"] == [-100] + row["input_ids"][1:]  # every token but the first, which nothing predicts

    cut, _ = load_head(tmp_path / "cut", pairs(), max_length=9)  # example 4's answer lies beyond 9 tokens
    assert cut.trained("train", [4], None) == 0 and cut.trained("train", [0], None) == 1  # animal, not [SEP]


def test_every_assistant_turn_of_a_conversation_trains(tmp_path):
    head, tok = load_head(tmp_path, [{"messages": CHAT}], messages_field="messages")
    row = head.splits["train"][0]
    trained = [tok.convert_ids_to_tokens(t) for t in row["labels"] if t != -100]
    assert trained == ["animal", "[SEP]", "colour", "[SEP]"]
    assert row["reference"] == "colour"  # generation answers the last turn
    prompt = tok.convert_ids_to_tokens(row["input_ids"][: row["prompt_length"]])
    assert prompt[-2:] == ["[SEP]", "assistant:"] and "colour" not in prompt


def test_the_loss_weighs_every_answer_token_of_the_global_batch_alike(tmp_path):
    """Two ranks × two micro-batches of two: each micro-batch's loss as the stage makes it, through DeepSpeed's
    arithmetic (1/grad_accum in backward, the mean over ranks), gives the gradient of the global batch's mean
    loss per answer token, which here differs from the mean of per-example means."""
    import torch
    import torch.nn.functional as F

    from stages.sft import Grouped, answer_loss

    rows = pairs() + pairs(2)
    head, tok = load_head(tmp_path, rows)
    model = tiny("gpt2", len(tok))
    net = head.module(model)
    world, accum, micro = 2, 2, 2
    samplers = [Grouped(head.lengths("train"), lambda ix, cut: head.trained("train", ix, cut), seed=3, micro=micro,
                        accum=accum, world=world, rank=r, max_length=64, group=True) for r in range(world)]
    steps = [s.next_step() for s in samplers]
    assert samplers[0].tokens == samplers[1].tokens  # both ranks divide by the same N
    drawn = [i for rank in steps for m in rank for i, _ in m]
    assert sorted(drawn) == sorted(range(len(rows)))[: len(drawn)] or len(set(drawn)) == len(drawn)
    n = samplers[0].tokens
    assert n == head.trained("train", drawn, None)

    model.zero_grad()
    for step in steps:
        for keys in step:
            batch = head.batch("train", keys)
            loss = answer_loss(head, net(**batch), batch, accum * world / n)
            (loss / accum / world).backward()  # DeepSpeed: loss / grad_accum, then the gradients' mean over ranks
    got = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad()
    batch = head.batch("train", [(i, 0) for i in drawn])
    tokens = F.cross_entropy(net(**batch).float(), head.targets(batch), reduction="none")
    assert len(tokens) == n
    tokens.mean().backward()
    for k, p in model.named_parameters():
        assert torch.allclose(got[k], p.grad, atol=1e-7, rtol=1e-5), k
    with torch.no_grad():
        per_example = head.example_losses(net, drawn).mean()
    assert abs(float(per_example) - tokens.mean().item()) > 1e-3  # the weighting is not the per-example mean


# ----------------------------------------------------------------- packing


PACKED_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "qwen3")


@pytest.mark.parametrize("family", PACKED_FAMILIES)
def test_packed_rows_give_each_example_its_unpacked_loss(tmp_path, family):
    import torch

    from stages.runtime.heads.sft import PACKS, check_packing

    assert family in PACKS
    rows = pairs()
    plain, tok = load_head(tmp_path / "plain", rows, train_on_prompt=True)
    packed, _ = load_head(tmp_path / "packed", rows, train_on_prompt=True, packing=True, max_length=24)
    model = tiny(family, len(tok))
    check_packing(model.config)
    keys = [(i, 0) for i in range(len(rows))]
    batch = packed.batch("train", keys)
    assert batch["input_ids"].shape[0] < len(rows) and "attention_mask" not in batch  # several examples a row
    assert (batch["position_ids"] == 0).sum() >= len(rows)  # positions restart at every example
    with torch.no_grad():
        want = plain.example_losses(plain.module(model), list(range(len(rows))))
        got = packed.example_losses(packed.module(model), list(range(len(rows))))
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got, want)
    # without its position ids the packed row is one sequence, and the later examples see the earlier ones
    del batch["position_ids"]
    with torch.no_grad():
        leaked = packed.module(model)(**batch)
    assert not torch.allclose(leaked, packed.module(model)(**packed.batch("train", keys)), atol=1e-4)


def test_packing_is_refused_where_the_model_would_mix_examples():
    from transformers import AutoConfig

    from stages.runtime.heads.sft import check_packing
    from stages.runtime.spec import SpecError

    with pytest.raises(SpecError, match="model type 'opt' does not keep packed examples apart"):
        check_packing(AutoConfig.for_model("opt"))
    config = AutoConfig.for_model("llama")
    config._attn_implementation = "flex_attention"
    with pytest.raises(SpecError, match="attention implementation 'flex_attention'"):
        check_packing(config)


# ----------------------------------------------------------------- eval: generation, labels


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(tmp_path, family):
    head, tok = load_head(tmp_path, pairs(), max_new_tokens=6)
    model = tiny(family, len(tok))
    prompts = [r[: n] for r, n in zip(head.splits["eval"]["input_ids"], head.splits["eval"]["prompt_length"],
                                      strict=True)]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    together = head._generate(model, prompts, 64)
    alone = [head._generate(model, [p], 64)[0] for p in prompts]
    assert together == alone and any(together)


def test_eval_reports_exact_match_and_label_accuracy_and_writes_the_generations(tmp_path):
    import torch

    from stages.runtime.dist import Dist

    labels = ["animal", "colour", "blue", "hi"]
    rows = [r for r in pairs() if r["completion"] in labels]
    head, tok = load_head(tmp_path, rows, label_set=labels, max_new_tokens=4)
    assert head.metrics == ("eval_loss", "perplexity", "exact_match", "accuracy")
    model = tiny("gpt2", len(tok))
    predictions = tmp_path / "eval_predictions.jsonl"
    d = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    metrics = head.evaluate(head.module(model), "eval", 2, d, predictions=str(predictions))
    written = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["index"] for r in written] == list(range(len(rows)))
    assert [r["reference"] for r in written] == [r["completion"] for r in rows]
    assert metrics["exact_match"] == sum(r["exact_match"] for r in written) / len(rows)
    assert metrics["accuracy"] == sum(r["correct"] for r in written) / len(rows)
    assert math.isclose(metrics["perplexity"], math.exp(metrics["eval_loss"]))
    # accuracy picks the likeliest label: recomputed from the model's own scores of each answer
    with torch.no_grad():
        for r, row in zip(written, head.splits["eval"], strict=True):
            prompt = row["input_ids"][: row["prompt_length"]]
            scores = []
            for answer in head.label_ids:
                ids = torch.tensor([prompt + answer])
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                scores.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(answer)))
            assert r["label"] == labels[max(range(len(labels)), key=scores.__getitem__)]


def test_a_completion_outside_the_labels_is_refused(tmp_path):
    from stages.runtime.spec import SpecError

    with pytest.raises(SpecError, match="sft.label_set: eval example 4: its completion 'animal and animal'"):
        load_head(tmp_path, pairs(), label_set=["animal", "colour", "blue", "hi"])


def test_the_tokenizers_own_template_is_used_and_another_refused(tmp_path):
    from contract.heads.sft import DEFAULT_TEMPLATE, SftOptions
    from stages.runtime.heads.sft import chat_template
    from stages.runtime.spec import SpecError

    tok = word_tokenizer(tmp_path)
    assert chat_template(tok, SftOptions()) == DEFAULT_TEMPLATE
    own = "{% for m in messages %}{{ m['content'] }} [SEP] {% endfor %}{% if add_generation_prompt %}{% endif %}"
    assert chat_template(tok, SftOptions(template=own)) == own
    tok.chat_template = own
    assert chat_template(tok, SftOptions()) == own == chat_template(tok, SftOptions(template=own))
    with pytest.raises(SpecError, match="the tokenizer has a chat template of its own"):
        chat_template(tok, SftOptions(template=DEFAULT_TEMPLATE))


# ----------------------------------------------------------------- the sampler


def _sampler(lengths, rank=0, step=0, samples=0, group=True, world=2):
    from stages.sft import Grouped

    return Grouped(lengths, lambda ix, cut: sum(min(lengths[i], cut or 99) for i in ix), seed=7, micro=2, accum=2,
                   world=world, rank=rank, max_length=64, group=group, step=step, samples=samples)


def test_the_sampler_is_a_function_of_the_position_and_groups_by_length():
    import random

    lengths = [random.Random(i).randint(4, 60) for i in range(70)]
    run = _sampler(lengths)
    steps = [run.next_step() for _ in range(40)]  # 40 × 8 = 320 draws: more than 4 epochs of 70
    for s in (1, 17, 35):  # resumed at step s: the same draws from there on
        resumed = _sampler(lengths, step=s, samples=s * 8)
        assert [resumed.next_step() for _ in range(40 - s)] == steps[s:]
    other = _sampler(lengths, rank=1)
    both = [[i for m in a for i in m] + [i for m in b for i in m] for a, b in zip(steps, (other.next_step()
                                                                                         for _ in steps), strict=True)]
    stream = [item for step in both for item in step]
    for epoch in range(4):  # every example once an epoch
        assert sorted(i for i, e in stream if e == epoch) == list(range(70))

    def padding(group: bool) -> int:
        s = _sampler(lengths, group=group, world=1)
        micro = [m for _ in range(35) for m in s.next_step()]
        return sum(max(lengths[i] for i, _ in m) * len(m) - sum(lengths[i] for i, _ in m) for m in micro)

    assert padding(True) < padding(False) / 3


# ----------------------------------------------------------------- templates at validate


MANIFEST = """\
version: 1
run: {{name: bad}}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: train.txt}}
  - name: sft
    kind: sft
    init: {{config: {{model_type: gpt2}}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: train.jsonl}}
    train: {{max_steps: 2}}
    sft:
      messages_field: messages
      template: {template}
"""


@pytest.mark.parametrize(("template", "message"), [
    ('"{% for m in messages %}{{ m.content }}{% endfor"', "line 1 of the template: unexpected end of template"),
    ('"{{ messages[0].content }}"', "message 1 (assistant): its content is not in what the template writes"),
    ('"{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}"',
     "what follows the generation prompt must be the answer itself"),
    ('"{% for m in messages %}{% if m.role != \'assistant\' %}{{ m.content }}{% endif %}{% endfor %}'
     '{% if add_generation_prompt %}>{% endif %}"', "the template does not write it after the prompt"),
    ('"{% for m in messages %}{% if m.role == \'system\' %}{{ raise_exception(\'no system prompt\') }}{% endif %}'
     '{{ m.role }}: {{ m.content }}\\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"',
     "TemplateError: no system prompt"),
])
def test_a_bad_template_is_refused_at_validate_with_its_line(tmp_path, template, message):
    (tmp_path / "train.txt").write_text("a b c\n")
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    manifest = tmp_path / "sft.yaml"
    manifest.write_text(MANIFEST.format(template=template))
    proc = cli_in_process(["validate", str(manifest)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"baton: {manifest}:15 stages[1].sft.template: "), line
    assert message in line and "Traceback" not in proc.stderr


def test_the_global_batch_and_its_answer_tokens_do_not_depend_on_the_world_size():
    """What a resume at another world size (checkpoint.on_world_size_change: resume) relies on: with the global
    batch kept, every step draws the same examples and divides by the same answer tokens, however many ranks and
    micro-batches share them."""
    import random

    lengths = [random.Random(i).randint(4, 60) for i in range(50)]

    def drawn(world: int, accum: int) -> list[tuple[list[tuple[int, int]], int]]:
        from stages.sft import Grouped

        samplers = [Grouped(lengths, lambda ix, cut: sum(lengths[i] for i in ix), seed=7, micro=2, accum=accum,
                            world=world, rank=r, max_length=64, group=True) for r in range(world)]
        steps = []
        for _ in range(20):
            items = sorted(item for s in samplers for micro in s.next_step() for item in micro)
            assert len({s.tokens for s in samplers}) == 1
            steps.append((items, samplers[0].tokens))
        return steps

    assert drawn(2, 2) == drawn(1, 4) == drawn(4, 1)


# ----------------------------------------------------------------- the stage under torchrun (slow)


STEPS, EVERY = 12, 4
LABELS = "[animal, artifact, body, food, location, person, plant, substance]"
TINY_GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 96}"
TINY_LLAMA = ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
              "num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 96}")


def sft(name: str, *, model: str = TINY_GPT2, zero: str = "zero3", extra: str = "", launcher: str = "{}") -> str:
    return f"""
  - name: {name}
    kind: sft
    init: {{config: {model}}}
    tokenizer: {{from: tokenizer}}
    launcher: {launcher}
    deepspeed: {{config: {zero}}}
    data: {{train: data/sft_train.jsonl, eval: data/sft_eval.jsonl, max_length: 64}}
    train: {{max_steps: {STEPS}, micro_batch_size: 4, grad_accum: 2, lr: 3.0e-3, warmup_steps: 2, log_every: 2}}
    checkpoint: {{every_steps: {EVERY}}}
    eval: {{every_steps: {EVERY}}}{extra}"""


STAGE_MANIFEST = specs.head("sft") + sft("sft-ref", extra=f"\n    sft: {{max_new_tokens: 3, label_set: {LABELS}}}") \
    + sft("sft-kill", extra=f"\n    sft: {{max_new_tokens: 3, label_set: {LABELS}}}") + sft(
    "sft-packed", model=TINY_LLAMA, zero="zero2", extra="""
    sft: {packing: true}
    curriculum:
      order: easy_first
      difficulty: {by: length}
      log_draws: true
      phases: [{until_step: 6, data_fraction: 0.5, max_length: 40}, {}]""") + sft(
    "sft-opt", model="{model_type: opt, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, ffn_dim: 64, "
    "word_embed_proj_dim: 32, max_position_embeddings: 96}", launcher="{nproc_per_node: 1}",
    extra="\n    sft: {packing: true}") + f"""
  - name: sft-distill
    kind: distill
    init: {{config: {TINY_GPT2}}}
    teacher: {{from: sft-ref}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/sft_train.jsonl, eval: data/sft_eval.jsonl, max_length: 64}}
    train: {{max_steps: 4, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 1, log_every: 2}}
    distill: {{task: sft, alpha: 0.5, head: {{max_new_tokens: 0}}}}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sft")
    specs.copy_data(root / "data")
    for split, n in (("train", 200), ("eval", 45)):  # 45: odd, so one rank's last eval batch has a padding row
        lines = (specs.WORDNET / f"sft_{split}.jsonl").read_text().splitlines()[:n]
        (root / "data" / f"sft_{split}.jsonl").write_text("\n".join(lines) + "\n")
    stages = specs.Stages(root, STAGE_MANIFEST, root / "hf")
    stages.run("tokenizer")
    return {"root": root, "stages": stages}


@pytest.fixture(scope="module")
def ref(work) -> dict:
    return work["stages"].run("sft-ref")


@pytest.mark.slow
def test_the_stage_trains_evaluates_and_hands_on_a_chat_model(work, ref):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from contract.heads.sft import DEFAULT_TEMPLATE
    from stages.runtime.heads.sft import normalise

    metrics = ref["metrics"]
    assert set(metrics) == {"eval_loss", "perplexity", "exact_match", "accuracy"}
    assert all(math.isfinite(v) for v in metrics.values())
    folder = Path(ref["output"]["path"]).parent
    assert [r["step"] for r in specs.records(folder, "eval")] == [4, 8, 12]

    final = ref["output"]["path"]
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == DEFAULT_TEMPLATE  # saved with final/: the model's prompts as it was trained
    rows = [json.loads(line) for line in (work["root"] / "data" / "sft_eval.jsonl").read_text().splitlines()]
    written = [json.loads(line) for line in (folder / "eval_predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in written] == list(range(45))
    assert [r["reference"] for r in written] == [r["completion"] for r in rows]
    assert metrics["exact_match"] == sum(r["exact_match"] for r in written) / 45
    assert metrics["accuracy"] == sum(r["correct"] for r in written) / 45

    # The generations again, from final/ alone: its chat template, greedy, up to the end token
    with torch.no_grad():
        for row, record in zip(rows[:12], written, strict=False):
            text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            out = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=model.config.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            if model.config.eos_token_id in out:
                out = out[: out.index(model.config.eos_token_id)]
            assert normalise(tok.decode(out, skip_special_tokens=True)) == normalise(record["prediction"])


@pytest.mark.slow
def test_distill_with_task_sft_reads_the_data_as_the_sft_head_does(work, ref):
    """A student distilled from the sft stage on its answer tokens: the same head (template, trained tokens)."""
    result = work["stages"].run("sft-distill")
    metrics = result["metrics"]
    assert {"eval_loss", "perplexity", "teacher_agreement"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    folder = Path(result["output"]["path"]).parent
    terms = specs.records(folder, "loss_terms")
    assert terms and all({"task", "kd"} == set(r["terms"]) for r in terms)


@pytest.mark.slow
def test_killed_and_resumed_equals_uninterrupted_zero3(work, ref):
    import torch
    from safetensors.torch import load_file

    spec = work["stages"].spec("sft-kill")
    assert spec.fingerprint == work["stages"].spec("sft-ref").fingerprint
    work["stages"].kill_after_first_checkpoint(spec)
    result = work["stages"].run("sft-kill", spec)
    folder = Path(spec.stage_dir)
    start = specs.records(folder, "start")
    assert len(start) == 2 and start[1]["step"] > 0, start
    ref_dir = Path(ref["output"]["path"]).parent
    resumed = {r["step"]: r["loss"] for r in specs.records(folder, "train")}
    uninterrupted = {r["step"]: r["loss"] for r in specs.records(ref_dir, "train")}
    assert resumed and all(resumed[s] == uninterrupted[s] for s in resumed)
    assert result["metrics"] == ref["metrics"]
    assert (folder / "eval_predictions.jsonl").read_text() == (ref_dir / "eval_predictions.jsonl").read_text()
    got = load_file(str(Path(result["output"]["path"], "model.safetensors")))
    want = load_file(str(Path(ref["output"]["path"], "model.safetensors")))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_packed_llama_with_a_length_curriculum(work):
    result = work["stages"].run("sft-packed")
    assert set(result["metrics"]) == {"eval_loss", "perplexity", "exact_match"}
    assert math.isfinite(result["metrics"]["eval_loss"])
    folder = Path(result["output"]["path"]).parent
    phases = specs.records(folder, "phase")
    assert [p["first_step"] for p in phases] == [1, 7] and phases[0]["max_length"] == 40
    draws = specs.records(folder, "draw")
    assert [d["step"] for d in draws] == list(range(1, STEPS + 1))
    # easy first: the first phase draws only from the shorter half of the training examples (tokens each)
    from transformers import AutoTokenizer

    from contract.spec import DataSpec
    from stages.runtime import heads

    spec = work["stages"].spec("sft-packed")
    tok = AutoTokenizer.from_pretrained(spec.ref("tokenizer").path)
    data = DataSpec.model_validate(spec.data.model_dump() | {"eval_files": []})
    lengths = heads.load("sft", heads.Source(data=data, tokenizer=tok, tokenizer_digest="test", seed=0,
                                             cache_dir=str(work["root"] / "lengths"))).lengths("train")
    pool = set(sorted(range(len(lengths)), key=lambda i: (lengths[i], i))[:100])
    first = {i for d in draws[:6] for i in d["indices"]}
    assert first <= pool and {i for d in draws[6:] for i in d["indices"]} - pool


@pytest.mark.slow
def test_packing_a_model_that_would_mix_examples_exits_2(work):
    """Run as a single process without torchrun, which would fold the exit code into 1."""
    import socket

    spec = work["stages"].spec("sft-opt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = work["stages"].env() | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": str(port)}
    argv = [sys.executable, "-m", "stages.sft", "--spec", str(specs.write_spec(spec))]
    result = subprocess.run(argv, cwd=specs.REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("baton stage error: sft.packing: model type 'opt' does not keep packed examples"), last
    assert not Path(spec.stage_dir, "ckpt").exists()


def test_a_shared_text_set_scores_an_sft_model_as_the_causal_lm_it_is(tmp_path):
    """The launcher gives an sft stage the `text` sets (contract.heads: fits text): each line a document, as clm."""
    import torch

    from contract.spec import DataSpec
    from stages.runtime import heads
    from stages.runtime.dist import Dist

    lines = tmp_path / "text.txt"
    lines.write_text("what is a cat ?\n\nthe colour of a bird\n")
    data = DataSpec(train_files=[], eval_files=[str(lines)], format="text", hub=None, text_field="text",
                    text_pair_field=None, label_field="label", labels=None, max_length=32, digests={})
    tok = word_tokenizer(tmp_path / "tokenizer")
    head = heads.load("sft", heads.Source(data=data, tokenizer=tok, tokenizer_digest="test", seed=1,
                                          cache_dir=str(tmp_path / "c"), key="evals.text", eval_only=True,
                                          options={"max_new_tokens": 3}))
    assert head.name == "clm" and len(head.splits["eval"]) == 2
    model = tiny("gpt2", len(tok))
    d = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert set(head.evaluate(head.module(model), "eval", 2, d)) == {"eval_loss", "perplexity"}
