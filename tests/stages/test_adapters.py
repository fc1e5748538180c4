"""LoRA adapters (`adapter:` on a training stage): what validate refuses, the merged model against peft's own merge
(fast, in-process on tiny models); then sft stages under torchrun (slow): 2 gloo ranks at ZeRO 0-3 training only
the adapter, final/ with the adapter and the merged model giving the trained model's logits, a ZeRO-3 stage killed
and resumed bitwise, a resume at another world size, and an adapter kept unmerged and continued by a later stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.conftest import cli_in_process
from tests.stages import specs

R = 4
TARGETS = ["c_attn", "c_fc"]
GPT2 = dict(n_embd=32, n_layer=2, n_head=2, n_positions=96, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_gpt2(vocab: int = 60, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("gpt2", vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3, **GPT2)
    return AutoModelForCausalLM.from_config(config).eval()


def trained_lora(model, **settings: Any):
    """`model` with a LoRA adapter whose B matrices are not zero (as after training) and a modules_to_save copy
    that differs from the original."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=R, lora_alpha=8, **settings))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return peft.eval()


# ----------------------------------------------------------------- the merged model, the adapter switched off


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_the_merged_state_is_peft_merge_and_loads_into_a_plain_model(family):
    """`adapters.merged` (which leaves the model as it is) against peft's merge_and_unload (which changes it in
    place): the same tensors under the plain model's names; loaded into a plain model they give the adapted
    model's logits. GPT-2's Conv1D (fan_in_fan_out) and tied LM head; BERT's classifier as modules_to_save."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from stages.runtime import adapters

    if family == "gpt2":
        model, settings = tiny_gpt2(), dict(target_modules=TARGETS, fan_in_fan_out=True)
    else:
        torch.manual_seed(0)
        config = AutoConfig.for_model("bert", vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, num_labels=3)
        model, settings = AutoModelForSequenceClassification.from_config(config).eval(), dict(
            target_modules=["query", "value"], modules_to_save=["classifier"])
    plain = copy.deepcopy(model)
    peft = trained_lora(model, **settings)
    ids = torch.randint(4, 60, (2, 12))
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        state = adapters.merged(peft)
        oracle = copy.deepcopy(peft).merge_and_unload().state_dict()
    assert state.keys() == plain.state_dict().keys() == oracle.keys()
    assert all(torch.allclose(state[k], oracle[k], atol=1e-6) for k in oracle)
    plain.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-5)
        assert not torch.allclose(peft(input_ids=ids).logits, plain.__class__(plain.config).eval()(
            input_ids=ids).logits, atol=1e-3)  # the adapter changed the model: the comparison means something


def test_disabled_gives_the_base_model():
    """The frozen reference of preference tuning: the adapted model with the adapter switched off is the base."""
    import copy

    import torch

    from stages.runtime import adapters

    model = tiny_gpt2()
    base = copy.deepcopy(model)
    peft = trained_lora(model, target_modules=TARGETS, fan_in_fan_out=True)
    ids = torch.randint(4, 60, (2, 12))
    with torch.no_grad():
        adapted = peft(input_ids=ids).logits
        with adapters.disabled(peft.get_base_model()):
            assert torch.equal(peft(input_ids=ids).logits, base(input_ids=ids).logits)
        assert torch.equal(peft(input_ids=ids).logits, adapted)
        assert not torch.allclose(adapted, base(input_ids=ids).logits, atol=1e-3)


# ----------------------------------------------------------------- validate


VALIDATE = """\
version: 1
run: {{name: bad}}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: train.txt}}
  - name: first
    kind: sft
    init: {{config: {{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2}}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: train.jsonl}}
    train: {{max_steps: 2}}
    adapter:
      {first}
  - name: second
    kind: sft
    init: {init}
    tokenizer: {{from: tokenizer}}
    data: {{train: train.jsonl}}
    train: {{max_steps: 2}}
    {second}
"""


def validate(tmp_path: Path, first: str = "{r: 4}", second: str = "",
             init: str = "{config: {model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2}}") -> tuple[int, list[str]]:
    (tmp_path / "train.txt").write_text("a b c\n")
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    manifest = tmp_path / "lora.yaml"
    manifest.write_text(VALIDATE.format(first=first, second=second, init=init))
    with mock.patch.dict(os.environ, {"BATON_CACHE_DIR": str(tmp_path / "c")}):  # every model check made anew
        proc = cli_in_process(["validate", str(manifest)], tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, [line.removeprefix(f"baton: {manifest}:") for line in proc.stderr.strip().splitlines()]


def test_a_valid_adapter_passes_validate(tmp_path):
    code, lines = validate(tmp_path, "{r: 4, target_modules: [c_attn, mlp.c_proj], modules_to_save: [lm_head]}")
    assert code == 0, lines


def test_target_modules_that_match_nothing_are_refused_with_the_models_names(tmp_path):
    code, lines = validate(tmp_path, "{target_modules: [q_proj, c_attn], modules_to_save: [classifier]}")
    assert code == 2
    assert lines[0].startswith("14 stages[1].adapter.target_modules: q_proj names no module of the model (a gpt2 "
                               "config); its modules are named "), lines
    assert "c_attn" in lines[0] and "c_fc" in lines[0] and "lm_head" in lines[0]
    assert lines[1].startswith("14 stages[1].adapter.modules_to_save: classifier names no module"), lines


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA machine may run QLoRA")
def test_qlora_is_refused_at_validate_without_a_cuda_device(tmp_path):
    code, lines = validate(tmp_path, "{quantize: 4bit}")
    assert code == 2
    assert lines == [f"14 stages[1].adapter.quantize: QLoRA (quantize: 4bit) needs a CUDA device, and torch "
                     f"{__import__('torch').__version__} sees none here; leave quantize out to train the adapter on "
                     "the base model as it is"], lines


@pytest.mark.parametrize(("first", "init", "second", "message"), [
    ("{merge: false}", "{from: first}", "",
     "17 stages[2].init.from: stage 'first' is a sft stage and gives no model (it gives: adapter, tokenizer)"),
    ("{merge: false}", "{from: tokenizer}", "adapter: {from: first, r: 8}",
     "21 stages[2].adapter.r: the adapter continued from stage 'first' brings its own r, alpha, dropout, "
     "target_modules, modules_to_save; leave r out"),
    ("{merge: false}", "{config: {model_type: gpt2}}", "adapter: {from: first}",
     "21 stages[2].adapter.from: an adapter is continued on the base model it was trained on: give init.from or "
     "init.pretrained, as the stage it comes from does"),
    ("{r: 4}", "{from: first}", "adapter: {from: tokenizer}",
     "21 stages[2].adapter.from: stage 'tokenizer' is a tokenizer stage and gives no adapter (it gives: tokenizer)"),
])
def test_a_continued_adapter_is_checked_at_validate(tmp_path, first, init, second, message):
    code, lines = validate(tmp_path, first, second, init)
    assert code == 2 and lines[0].startswith(message), lines


# ----------------------------------------------------------------- the stage under torchrun (slow)


STEPS, EVERY = 8, 4


def stage(name: str, *, zero: str, extra: str = "", launcher: str = "{}", steps: int = STEPS, accum: int = 2) -> str:
    return f"""
  - name: {name}
    kind: sft
    init: {{pretrained: base}}
    launcher: {launcher}
    deepspeed: {{config: {zero}}}
    data: {{train: data/sft_train.jsonl, eval: data/sft_eval.jsonl, max_length: 64}}
    train: {{max_steps: {steps}, micro_batch_size: 4, grad_accum: {accum}, lr: 1.0e-2, warmup_steps: 1, log_every: 1}}
    checkpoint: {{every_steps: {EVERY}, on_world_size_change: resume}}
    sft: {{max_new_tokens: 0}}
    adapter: {extra or f"{{r: {R}, target_modules: [{', '.join(TARGETS)}]}}"}"""


LORA = f"{{r: {R}, target_modules: [{', '.join(TARGETS)}]}}"
MANIFEST = """version: 1
run: {name: lora}
defaults:
  launcher: {nproc_per_node: 2}
stages:""" + "".join(stage(f"lora-{z}", zero=z) for z in ("zero0", "zero1", "zero2", "zero3")) + stage(
    "lora-kill", zero="zero3") + stage("lora-ws", zero="zero2", launcher="{nproc_per_node: 1}", accum=4) + stage(
    "lora-keep", zero="zero2", extra=f"{{r: {R}, target_modules: [c_attn], merge: false}}", steps=4) + stage(
    "lora-more", zero="zero3", extra="{from: lora-keep}", steps=4) + "\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A tiny GPT-2 base (no dropout) with the run's sentencepiece tokenizer in base/, and the sft data."""
    root = tmp_path_factory.mktemp("lora")
    specs.copy_data(root / "data")
    for split, n in (("train", 200), ("eval", 45)):
        lines = (specs.WORDNET / f"sft_{split}.jsonl").read_text().splitlines()[:n]
        (root / "data" / f"sft_{split}.jsonl").write_text("\n".join(lines) + "\n")
    tokenizers = specs.Stages(root / "tok", specs.head("tok").replace("data/", str(root / "data") + "/"), root / "hf")
    tokenizers.run("tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizers.outputs["tokenizer"]["path"])
    model = tiny_gpt2(vocab=len(tok))
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = (
        tok.pad_token_id, tok.cls_token_id, tok.sep_token_id)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return {"root": root, "stages": specs.Stages(root, MANIFEST, root / "hf")}


def adapter_record(result: dict[str, Any]) -> dict[str, Any]:
    (record,) = specs.records(Path(result["output"]["path"]).parent, "adapter")
    return record


def weights(folder: str | Path, name: str = "model.safetensors"):
    from safetensors.torch import load_file

    return load_file(str(Path(folder, name)))


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero0", pytest.param("zero1", marks=pytest.mark.full),
                                  pytest.param("zero2", marks=pytest.mark.full), "zero3"])
def test_only_the_adapter_trains_and_final_holds_it_and_the_merged_model(work, zero):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = work["stages"].run(f"lora-{zero}")
    final = Path(result["output"]["path"])
    base = weights(work["root"] / "base")
    # LoRA on c_attn (32 -> 96) and c_fc (32 -> 128) of 2 layers: r × (in + out) each
    want = 2 * R * ((32 + 96) + (32 + 128))
    record = adapter_record(result)
    assert record["trainable_params"] == want and record["total_params"] == want + sum(
        v.numel() for k, v in base.items() if k != "lm_head.weight")  # tied to the embedding
    # ZeRO's optimizer partitions, gathered: exactly the adapter's matrices
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if zero != "zero0":
        ckpt = final.parent / "ckpt"
        held = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), (ckpt / "LATEST").read_text().strip(),
                                                        exclude_frozen_parameters=True)
        assert sum(v.numel() for v in held.values()) == want and all("lora_" in k for k in held), sorted(held)

    adapter = weights(final / "adapter", "adapter_model.safetensors")
    assert {k.split("lora_")[1].split(".")[0] for k in adapter} == {"A", "B"}
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # B starts at zero: it trained
    merged = weights(final)
    assert merged.keys() == base.keys()
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert changed == {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")}

    ids = torch.randint(5, 900, (3, 20))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(final).eval()
        assert not any("lora" in n for n, _ in plain.named_modules())  # the merged model, not base + adapter
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work["root"] / "base"),
                                         final / "adapter").eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        for k, v in peft.get_base_model().state_dict().items():  # the base under the adapter is unchanged
            if "lora_" not in k and k != "lm_head.weight":  # tied to the embedding, which base holds
                assert torch.equal(v, base[k.replace(".base_layer.", ".")]), k


@pytest.mark.slow
def test_killed_and_resumed_equals_uninterrupted_zero3(work):
    import torch

    stages = work["stages"]
    ref = stages.run("lora-zero3") if "lora-zero3" not in stages.outputs else {"output": stages.outputs["lora-zero3"]}
    spec = stages.spec("lora-kill")
    assert spec.fingerprint == stages.spec("lora-zero3").fingerprint
    stages.kill_after_first_checkpoint(spec)
    result = stages.run("lora-kill", spec)
    folder, ref_dir = Path(spec.stage_dir), Path(ref["output"]["path"]).parent
    start = specs.records(folder, "start")
    assert len(start) == 2 and start[1]["step"] > 0, start
    resumed = {r["step"]: r["loss"] for r in specs.records(folder, "train")}
    uninterrupted = {r["step"]: r["loss"] for r in specs.records(ref_dir, "train")}
    assert resumed and all(resumed[s] == uninterrupted[s] for s in resumed)
    for folder_name, name in (("adapter", "adapter_model.safetensors"), ("", "model.safetensors")):
        got = weights(Path(result["output"]["path"], folder_name), name)
        want = weights(Path(ref["output"]["path"], folder_name), name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert result["output"]["digest"] == ref["output"]["digest"]


@pytest.mark.slow
def test_resumed_at_another_world_size_goes_on_as_the_same_run(work):
    """Stopped at 2 ranks (ZeRO-2), resumed at 1 with the same global batch through the universal checkpoint: the
    losses and the adapter go on as the uninterrupted 2-rank run's, up to the order of float sums."""
    import torch

    stages = work["stages"]
    ref = stages.run("lora-zero2") if "lora-zero2" not in stages.outputs else {"output": stages.outputs["lora-zero2"]}
    two = specs.Stages(work["root"], MANIFEST.replace(  # the same stage folder, at 2 ranks
        'launcher: {nproc_per_node: 1}\n    deepspeed: {config: zero2}', "launcher: {}\n    deepspeed: {config: zero2}"
    ).replace("grad_accum: 4", "grad_accum: 2"), work["root"] / "hf")
    first = two.spec("lora-ws")
    assert first.world_size == 2
    two.kill_after_first_checkpoint(first)
    spec = stages.spec("lora-ws")
    assert spec.world_size == 1 and spec.fingerprint_any_world == first.fingerprint_any_world
    result = stages.run("lora-ws", spec)
    folder = Path(spec.stage_dir)
    start = specs.records(folder, "start")
    assert start[-1]["resharded_from"] == 2, start
    got = {r["step"]: r["loss"] for r in specs.records(folder, "train")}
    want = {r["step"]: r["loss"] for r in specs.records(Path(ref["output"]["path"]).parent, "train")}
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in got), (got, want)
    a = weights(Path(result["output"]["path"], "adapter"), "adapter_model.safetensors")
    b = weights(Path(ref["output"]["path"], "adapter"), "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in b)


@pytest.mark.slow
def test_an_unmerged_adapter_is_continued_by_a_later_stage(work):
    import torch

    stages = work["stages"]
    kept = stages.run("lora-keep")
    final = Path(kept["output"]["path"])
    assert not (final / "model.safetensors").exists() and not (final / "config.json").exists()
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "tokenizer.json").is_file()
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(work["root"] / "base") and config["target_modules"] == ["c_attn"]

    spec = stages.spec("lora-more")
    # the spec (and so the ledger and lineage) records both inputs by digest: the base model and the adapter
    assert spec.inputs["adapter"].digest == kept["output"]["digest"] and spec.inputs["adapter"].stage == "lora-keep"
    assert spec.inputs["init"].digest is not None and spec.inputs["init"].path == str(work["root"] / "base")
    more = stages.run("lora-more", spec)
    record = adapter_record(more)
    assert record["continued_from"] == str(final) and record["trainable_params"] == 2 * R * (32 + 96)
    first = specs.records(Path(more["output"]["path"]).parent, "train")[0]
    fresh = specs.records(final.parent, "train")[0]
    assert first["loss"] < fresh["loss"]  # it starts where lora-keep ended, not from a new adapter
    a = weights(final / "adapter", "adapter_model.safetensors")
    b = weights(Path(more["output"]["path"], "adapter"), "adapter_model.safetensors")
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


KINDS = specs.head("kinds") + f"""
  - name: mlm-lora
    kind: mlm
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero1}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: 4, micro_batch_size: 8, lr: 1.0e-2, log_every: 1}}
    eval: {{at_end: false}}
    adapter: {{r: 4}}
  - name: cls-lora
    kind: classify
    precision: bf16
    init: {{from: mlm-lora}}
    deepspeed: {{config: zero3}}
    data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}}
    train: {{max_steps: 4, micro_batch_size: 4, lr: 1.0e-2, log_every: 1}}
    adapter: {{r: 4, target_modules: [query, value], modules_to_save: [classifier, pooler]}}
"""


@pytest.mark.slow
def test_other_kinds_take_an_adapter_mlm_then_a_bf16_classifier_at_zero3(tmp_path):
    """mlm with peft's default target modules for BERT (query, value); then a classifier on its merged model in
    bf16 at ZeRO-3 with its new modules (classifier, and the pooler masked-LM checkpoints lack) as modules_to_save:
    final/ holds the fp32 masters, merged, and an adapter that gives the same logits on the base it names."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    specs.copy_data(tmp_path / "data")
    stages = specs.Stages(tmp_path, KINDS, tmp_path / "hf")
    stages.run("tokenizer")
    mlm = stages.run("mlm-lora")
    assert adapter_record(mlm)["trainable_params"] == 2 * 2 * R * (32 + 32)  # query and value of 2 layers
    result = stages.run("cls-lora")
    assert all(v == v for v in result["metrics"].values())  # not NaN
    final = Path(result["output"]["path"])
    record = adapter_record(result)
    classes = 8 * 32 + 8  # the supersense labels: classifier weight and bias, trained in full
    assert record["trainable_params"] > classes
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert merged.dtype == torch.float32 and merged.config.num_labels == 8
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        mlm["output"]["path"], num_labels=8), final / "adapter").eval()
    ids = torch.randint(5, 900, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
