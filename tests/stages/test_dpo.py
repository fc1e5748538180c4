"""Preference tuning (`dpo`): pairs written by the sft head's template, the loss and rewards against TRL's
DPOTrainer (a test-only oracle) for sigmoid, robust (label smoothing) and ipo, and bad manifests refused at validate
(fast, in-process on tiny models); then the stage run for real (slow): 2 gloo ranks at ZeRO-3 with the reference
partitioned by ZeRO-3, the rewards per step and at eval, killed and resumed bitwise, final/ as a causal LM with its
chat template; and a LoRA adapter trained against its own base with the adapter off as against a copy of the init.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_in_process
from tests.stages import specs
from tests.stages.test_sft import CHAT, PAIRS, load_head, tiny

# Each prompt with its right answer and a wrong one, in the words of test_sft's tokenizer
PREFERENCES = [{"prompt": p, "chosen": c, "rejected": r} for (p, c), r in
               zip(PAIRS, ["colour", "animal", "hi", "blue", "colour and colour", "animal"], strict=True)]


def test_both_answers_of_a_pair_are_written_by_the_sft_template(tmp_path):
    head, tok = load_head(tmp_path / "pairs", PREFERENCES, rejected_field="rejected")
    chosen, _ = load_head(tmp_path / "chosen", PREFERENCES, completion_field="chosen")
    rejected, _ = load_head(tmp_path / "rejected", PREFERENCES, completion_field="rejected")
    n = len(PREFERENCES)
    for i in range(n):
        row = head.splits["train"][i]
        assert row["input_ids"] == chosen.splits["train"][i]["input_ids"]
        assert row["labels"] == chosen.splits["train"][i]["labels"]
        assert row["rejected_input_ids"] == rejected.splits["train"][i]["input_ids"]
        assert row["rejected_labels"] == rejected.splits["train"][i]["labels"]
        assert row["reference"] == PREFERENCES[i]["chosen"]  # eval scores the chosen answers
    keys = [(i, 0) for i in range(n)]
    batch = head.pairs("train", keys)
    assert batch["input_ids"].shape[0] == 2 * n  # the chosen rows, then the rejected rows
    assert head.targets(batch).tolist() == head.targets(chosen.batch("train", keys)).tolist() + head.targets(
        rejected.batch("train", keys)).tolist()

    import torch

    model = tiny("gpt2", len(tok))
    with torch.no_grad():
        logps, tokens = head.answer_logps(head.module(model)(**batch), batch, 2 * n)
    sep = [tok.sep_token_id]
    assert tokens.tolist() == [len(tok(r[side], add_special_tokens=False)["input_ids"] + sep)
                               for side in ("chosen", "rejected") for r in PREFERENCES]
    # an example's summed log-probability is minus its mean loss times its answer tokens
    losses = chosen.example_losses(head.module(model), list(range(n)))
    assert torch.allclose(logps[:n], -losses * tokens[:n], atol=1e-5)


def test_conversation_pairs_learn_only_their_last_answer_and_share_the_prompt(tmp_path):
    worse = [*CHAT[:-1], {"role": "assistant", "content": "animal"}]
    head, tok = load_head(tmp_path / "ok", [{"messages": CHAT, "worse": worse}], messages_field="messages",
                          rejected_field="worse")
    row = head.splits["train"][0]
    assert [tok.convert_ids_to_tokens(t) for t in row["labels"] if t != -100] == ["colour", "[SEP]"]
    assert [tok.convert_ids_to_tokens(t) for t in row["rejected_labels"] if t != -100] == ["animal", "[SEP]"]

    from stages.runtime.spec import SpecError

    other = [*CHAT[:-2], {"role": "user", "content": "and blue ?"}, {"role": "assistant", "content": "animal"}]
    with pytest.raises(SpecError, match="a preference pair whose answers follow different prompts"):
        load_head(tmp_path / "bad", [{"messages": CHAT, "worse": other}], messages_field="messages",
                  rejected_field="worse")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """A tiny policy and a reference of other weights, the pairs as baton's sft head writes them, and TRL's
    DPOTrainer (test-only) around fresh copies of both models (TRL changes the models it is given)."""
    import copy

    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    root = tmp_path_factory.mktemp("oracle")
    head, tok = load_head(root, PREFERENCES, rejected_field="rejected")
    policy, reference = tiny("gpt2", len(tok)), tiny("gpt2", len(tok))
    torch.manual_seed(1)
    with torch.no_grad():  # a reference the policy has moved away from: rewards that are not 0
        for p in reference.parameters():
            p.add_(0.2 * torch.randn_like(p))
    batch = head.pairs("train", [(i, 0) for i in range(len(PREFERENCES))])
    trl_tok = copy.deepcopy(tok)
    trl_tok.eos_token = "[SEP]"  # TRL ends plain-text answers with EOS; its own dataset is not used below

    def trainer(**args):
        # fp32 throughout: on a CPU with bf16 the Trainer would run the reference under bf16 autocast
        config = DPOConfig(output_dir=str(root / "trl"), use_cpu=True, bf16=False, report_to="none", **args)
        return DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=config,
                          processing_class=trl_tok, train_dataset=Dataset.from_list(PREFERENCES[:1]))

    return head, policy, reference, batch, trainer


@pytest.mark.parametrize("loss", [{"loss": "sigmoid", "beta": 0.1}, {"loss": "sigmoid", "beta": 2.0},
                                  {"loss": "robust", "beta": 0.5, "label_smoothing": 0.2},
                                  {"loss": "ipo", "beta": 0.3}])
def test_loss_rewards_and_gradients_are_trls(oracle, loss):
    import torch

    from contract.kinds.dpo import REWARDS, DpoOptions
    from stages.dpo import preference_loss, reward_sums

    head, policy, reference, batch, trainer = oracle
    opts = DpoOptions.model_validate(loss)
    trl = trainer(beta=opts.beta, loss_type=[opts.loss], label_smoothing=opts.label_smoothing)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}  # the answer tokens, as TRL's collator marks them
    trl.model.train()
    want = trl.compute_loss(trl.model, inputs)
    want.backward()
    logged = {k: v[-1] for k, v in trl._metrics["train"].items()}

    n = batch["input_ids"].shape[0]
    policy.zero_grad()
    logps, tokens = head.answer_logps(head.module(policy)(**batch), batch, n)
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref, _ = head.answer_logps(head.select(logits, batch), batch, n)
    losses, rewards = preference_loss(logps.view(2, -1), ref.view(2, -1), tokens.view(2, -1), opts)
    got = losses.mean()
    got.backward()
    assert abs(float(got) - float(want)) < 1e-5, (float(got), float(want))
    assert bool((rewards != 0).all())  # the reference is another model: every reward counts
    for name, value in zip(REWARDS, (reward_sums(rewards) / (n // 2)).tolist(), strict=True):
        assert abs(value - logged[name]) < 1e-5, (name, value, logged[name])
    # the gradient DeepSpeed steps with is TRL's
    theirs = dict(trl.model.named_parameters())
    assert all(torch.allclose(p.grad, theirs[k].grad, atol=1e-6) for k, p in policy.named_parameters())


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
    data: {{train: sft.jsonl}}
    train: {{max_steps: 2}}
  - name: dpo
    kind: dpo
    init: {init}
    tokenizer: {{from: tokenizer}}
    data: {{train: train.jsonl, eval: train.jsonl}}
    train: {{max_steps: 2}}
    {extra}
"""


@pytest.mark.parametrize(("init", "extra", "line", "message"), [
    ("{config: {model_type: gpt2}}", "", 15, "stages[2].init.config: the reference is the init model as loaded"),
    ("{from: sft}", "dpo: {loss: sigmoid, label_smoothing: 0.1}", 19,
     "stages[2].dpo.label_smoothing: label_smoothing is for loss robust (loss is sigmoid)"),
    ("{from: sft}", "sft: {packing: true}", 19, "stages[2].sft.packing: preference pairs are batched"),
    ("{from: sft}", "gate: {require: rewards/accuracy >= 0.5}", 19,
     "unknown metric 'rewards/accuracy': stage 'dpo' (dpo) reports eval_loss, exact_match, perplexity, "
     "rewards/accuracies, rewards/chosen, rewards/margins, rewards/rejected"),
    ("{from: sft}", "dpo: {reference_placement: adapter}", 19, "stages[2].dpo.reference_placement: adapter: the "
     "reference is the policy's base with its adapter switched off"),
])
def test_a_bad_dpo_stage_is_refused_at_validate_with_its_line(tmp_path, init, extra, line, message):
    (tmp_path / "train.txt").write_text("a b c\n")
    (tmp_path / "train.jsonl").write_text(json.dumps(PREFERENCES[0]) + "\n")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    manifest = tmp_path / "dpo.yaml"
    manifest.write_text(MANIFEST.format(init=init, extra=extra))
    proc = cli_in_process(["validate", str(manifest)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{manifest}:{line} " in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------- the stage under torchrun

STEPS, EVERY = 8, 4
TINY_GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 96}"
DPO = """
  - name: {name}
    kind: dpo
    init: {{from: sft}}
    deepspeed: {{config: zero3}}
    data: {{train: data/dpo_train.jsonl, eval: data/dpo_train.jsonl, max_length: 64}}
    sft: {{max_new_tokens: 3, label_set: [animal, artifact, body, food, location, person, plant, substance]}}
    dpo: {{beta: 0.5, reference_placement: zero3}}
    train: {{max_steps: {steps}, micro_batch_size: 4, grad_accum: 2, lr: 2.0e-3, log_every: 1}}
    checkpoint: {{every_steps: {every}}}
    eval: {{every_steps: {every}}}"""
STAGE_MANIFEST = specs.head("dpo") + f"""
  - name: sft
    kind: sft
    init: {{config: {TINY_GPT2}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/sft_train.jsonl, max_length: 64}}
    train: {{max_steps: 12, micro_batch_size: 8, lr: 3.0e-3}}
""" + DPO.format(name="dpo-ref", steps=STEPS, every=EVERY) + DPO.format(name="dpo-kill", steps=STEPS, every=EVERY)
# the same adapter trained against a copy of the init model and against its own base with the adapter off
STAGE_MANIFEST += "".join(
    DPO.format(name=f"dpo-lora-{placement}", steps=4, every=4).replace("config: zero3", "config: zero2")
    .replace("reference_placement: zero3", f"reference_placement: {placement}")
    + "\n    adapter: {r: 4, target_modules: [c_attn, c_proj]}" for placement in ("replicate", "adapter"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    sys.path.insert(0, str(specs.REPO / "examples" / "data"))
    from build_dpo import preference

    root = tmp_path_factory.mktemp("dpo")
    specs.copy_data(root / "data")
    lines = (specs.WORDNET / "sft_train.jsonl").read_text().splitlines()[:200]
    (root / "data" / "sft_train.jsonl").write_text("\n".join(lines) + "\n")
    # 33 pairs trained on about twice in 8 steps of 8, and evaluated (odd: one rank's last eval batch has a padding
    # row): the eval rewards say what training did to these very pairs
    rows = [json.loads(line) for line in (specs.WORDNET / "supersense_train.jsonl").read_text().splitlines()]
    (root / "data" / "dpo_train.jsonl").write_text(
        "".join(json.dumps(preference(r, i)) + "\n" for i, r in enumerate(rows[:33])))
    stages = specs.Stages(root, STAGE_MANIFEST, root / "hf")
    stages.run("tokenizer")
    stages.run("sft")
    return {"root": root, "stages": stages}


@pytest.fixture(scope="module")
def ref(work) -> dict:
    return work["stages"].run_with_output("dpo-ref")


@pytest.mark.slow
def test_the_stage_prefers_the_chosen_answers_and_reports_the_rewards(work, ref):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from contract.heads.sft import DEFAULT_TEMPLATE
    from contract.kinds.dpo import REWARDS

    result, out = ref
    metrics = result["metrics"]
    assert set(metrics) == {"eval_loss", "perplexity", "exact_match", "accuracy", *REWARDS}
    assert all(math.isfinite(v) for v in metrics.values())
    assert math.isclose(metrics["rewards/margins"], metrics["rewards/chosen"] - metrics["rewards/rejected"],
                        abs_tol=1e-9)
    assert 0 <= metrics["rewards/accuracies"] <= 1
    # the policy now prefers the right supersense of the pairs it learnt more than the sft model does
    assert metrics["rewards/margins"] > 0 and metrics["rewards/accuracies"] > 0.5
    assert "init partitioned by ZeRO-3" in out
    folder = Path(result["output"]["path"]).parent
    assert [r["step"] for r in specs.records(folder, "eval")] == [4, 8]
    terms = specs.records(folder, "loss_terms")
    assert [r["step"] for r in terms] == list(range(1, STEPS + 1))
    assert all(set(r["terms"]) == set(REWARDS) for r in terms)
    # the policy starts as the reference (no dropout): the first step's rewards are those of its start, 0
    assert all(abs(v) < 1e-6 for k, v in terms[0]["terms"].items() if k != "rewards/accuracies")
    losses = [r["loss"] for r in specs.records(folder, "train")]
    assert abs(losses[0] - math.log(2)) < 1e-6  # −log σ(0)

    model = AutoModelForCausalLM.from_pretrained(result["output"]["path"])
    sft = AutoModelForCausalLM.from_pretrained(work["stages"].outputs["sft"]["path"])
    assert AutoTokenizer.from_pretrained(result["output"]["path"]).chat_template == DEFAULT_TEMPLATE
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), sft.state_dict().values(),
                                                      strict=True))


@pytest.mark.slow
def test_killed_and_resumed_equals_uninterrupted_zero3(work, ref):
    import torch
    from safetensors.torch import load_file

    result_ref = ref[0]
    spec = work["stages"].spec("dpo-kill")
    assert spec.fingerprint == work["stages"].spec("dpo-ref").fingerprint
    work["stages"].kill_after_first_checkpoint(spec)
    result = work["stages"].run("dpo-kill", spec)
    folder, ref_dir = Path(spec.stage_dir), Path(result_ref["output"]["path"]).parent
    start = specs.records(folder, "start")
    assert len(start) == 2 and start[1]["step"] > 0, start
    resumed = {r["step"]: r for r in specs.records(folder, "loss_terms")}
    uninterrupted = {r["step"]: r for r in specs.records(ref_dir, "loss_terms")}
    assert resumed and all(resumed[s]["terms"] == uninterrupted[s]["terms"] for s in resumed)
    losses = {r["step"]: r["loss"] for r in specs.records(folder, "train")}
    assert all(losses[s] == r["loss"] for s, r in ((r["step"], r) for r in specs.records(ref_dir, "train"))
               if s in losses)
    assert result["metrics"] == result_ref["metrics"]
    got = load_file(str(Path(result["output"]["path"], "model.safetensors")))
    want = load_file(str(Path(result_ref["output"]["path"], "model.safetensors")))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_an_adapters_own_base_is_the_reference_a_copy_would_be(work):
    """reference_placement adapter: the policy's frozen base with its adapter off, no second model. The same losses
    and rewards, step by step, and the same adapter as with a replicated copy of the init model."""
    import torch
    from safetensors.torch import load_file

    copy, own = (work["stages"].run_with_output(f"dpo-lora-{p}") for p in ("replicate", "adapter"))
    assert "reference adapter" in own[1] and "reference replicate" in copy[1]
    folders = [Path(r["output"]["path"]).parent for r, _ in (copy, own)]
    terms = [[r["terms"] for r in specs.records(f, "loss_terms")] for f in folders]
    assert len(terms[0]) == 4 and all(abs(v) < 1e-6 for k, v in terms[1][0].items() if k != "rewards/accuracies")
    for a, b in zip(*terms, strict=True):
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6) for k in a), (a, b)
    losses = [[r["loss"] for r in specs.records(f, "train")] for f in folders]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert copy[0]["metrics"] == pytest.approx(own[0]["metrics"], rel=1e-4, abs=1e-6)
    a, b = (load_file(str(Path(r["output"]["path"], "adapter", "adapter_model.safetensors"))) for r, _ in (copy, own))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
