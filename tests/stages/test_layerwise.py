"""Layer-wise fine-tuning (classify's `layerwise:` and train.layer_lr_decay): layer groups, gradual unfreezing
under ZeRO 2 and 3, layer-wise learning-rate decay, deep supervision; a kill in phase 2 and its resume.

The slow tests share one module-scoped set of runs of a tiny BERT (2 layers: groups embeddings, layer0,
layer1, head), started from a saved `pretrained` folder so the untouched weights are known: unfreezing one
group every 6 steps from the head alone, so phase 1 starts at step 6, phase 2 at 12, phase 3 at 18.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stages import specs

STEPS, EVERY, DECAY, LR, ALPHA = 24, 6, 0.5, 1.0e-3, [0.3, 0.7]
GROUPS = ["embeddings", "layer0", "layer1", "head"]


def classify(name: str, zero: int, *, layerwise: str, train: str = "", steps: int = STEPS) -> str:
    return f"""
  - name: {name}
    kind: classify
    init: {{pretrained: ./init}}
    deepspeed: {{config: zero{zero}}}
    data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}}
    train: {{max_steps: {steps}, micro_batch_size: 4, grad_accum: 2, lr: {LR}, warmup_steps: 2, weight_decay: 0.01,
             log_every: 2{train}}}
    checkpoint: {{every_steps: 7, keep_last: 10}}
    eval: {{at_end: false}}
    layerwise: {layerwise}"""


TOKENIZER = """version: 1
run: {name: tokenizer}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {train: data/pretrain.txt}
    sentencepiece: {vocab_size: 1000}
"""
LAYERWISE = f"{{unfreeze: {{start: 1, every_steps: {EVERY}}}, deep_supervision: {ALPHA}}}"
MANIFEST = """version: 1
run: {name: layerwise}
defaults:
  launcher: {nproc_per_node: 2}
stages:""" + "".join(
    classify(f"lw-{role}-z{z}", z, layerwise=LAYERWISE, train=f", layer_lr_decay: {DECAY}")
    for z, role in ((2, "ref"), (3, "ref"), (3, "kill"))) + "".join(
    classify(f"plain-{role}", 2, layerwise=layerwise, steps=8)
    for role, layerwise in (("none", "{}"), ("last-only", "{deep_supervision: [0, 1]}"))) + "\n"


# ----------------------------------------------------------------- fast: the manifest and the layer groups


def _problems(tmp_path: Path, stage: str) -> str:
    from launcher.errors import ConfigError
    from launcher.manifest import load

    (tmp_path / "data.jsonl").write_text('{"text": "a", "label": "x"}\n')
    path = tmp_path / "m.yaml"
    path.write_text(f"""version: 1
run: {{name: x}}
stages:
  - name: c
    kind: classify
    init: {{pretrained: bert-base-uncased}}
    data: {{train: data.jsonl}}
    {stage}
""")
    with pytest.raises(ConfigError) as e:
        load(path)
    return str(e.value)


@pytest.mark.parametrize(("stage", "key", "says"), [
    ("train: {max_steps: 1, layer_lr_decay: 0}", "train.layer_lr_decay", "greater than 0"),
    ("train: {max_steps: 1, layer_lr_decay: 1.5}", "train.layer_lr_decay", "less than or equal to 1"),
    ("train: {max_steps: 1, layer_lr_decay: true}", "train.layer_lr_decay", "not a boolean"),
    ("train: {max_steps: 1}\n    layerwise: {unfreeze: {start: 0, every_steps: 5}}", "layerwise.unfreeze.start",
     "greater than or equal to 1"),
    ("train: {max_steps: 1}\n    layerwise: {unfreeze: {start: 1}}", "layerwise.unfreeze.every_steps", "required"),
    ("train: {max_steps: 1}\n    layerwise: {deep_supervision: [0, 0]}", "layerwise.deep_supervision",
     "at least one"),
    ("train: {max_steps: 1}\n    layerwise: {deep_supervision: [1, -1]}", "layerwise.deep_supervision", "≥ 0"),
    ("train: {max_steps: 1}\n    layerwise: {deep_supervision: square}", "layerwise.deep_supervision", "linear"),
])
def test_bad_layerwise_settings_are_refused_naming_the_key(tmp_path, stage, key, says):
    message = _problems(tmp_path, stage)
    assert key in message and says in message, message


def test_profiles_give_one_weight_per_layer():
    from contract.kinds.classify import layer_weights

    assert layer_weights("last_only", 3) == [0, 0, 1]
    assert layer_weights("linear", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert layer_weights("uniform", 4) == [0.25] * 4
    with pytest.raises(ValueError, match="3 weights but the model has 2 layers"):
        layer_weights([1, 1, 1], 2)


@pytest.mark.parametrize("config", [
    {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
     "intermediate_size": 32, "vocab_size": 50},
    {"model_type": "gpt2", "n_embd": 16, "n_layer": 3, "n_head": 2, "vocab_size": 50, "pad_token_id": 0},
    {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
     "intermediate_size": 32, "vocab_size": 50, "pad_token_id": 0},
])
def test_layer_groups_of_encoders_and_decoders(config):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from stages.runtime import layers

    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**config, num_labels=4))
    found = layers.groups(model, model)
    assert [g.name for g in found] == ["embeddings", "layer0", "layer1", "layer2", "head"]
    assert sum(g.numel() for g in found) == sum(p.numel() for p in model.parameters())  # each parameter once
    head = {n for n, p in model.named_parameters() if any(p is q for q in found[-1].params)}
    assert any(n.startswith(("classifier", "score")) for n in head), head


def test_a_model_that_cannot_be_split_is_refused():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from stages.runtime import layers
    from stages.runtime.spec import SpecError

    t5 = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "t5", d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, vocab_size=50))  # encoder and decoder blocks
    with pytest.raises(SpecError, match=r"cannot split T5ForSequenceClassification into layers: 4 lists"):
        layers.groups(t5, t5)


# ----------------------------------------------------------------- slow: real stages under torchrun


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A tokenizer trained by the tokenizer stage, and a tiny BERT saved with it in init/, which the classify
    runs start from (its weights: work["init"])."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    root = tmp_path_factory.mktemp("layerwise")
    specs.copy_data(root / "data")
    tokenizer = specs.Stages(root, TOKENIZER, root / "hf").run("tokenizer")["output"]["path"]
    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, vocab_size=len(tok),
                                  pad_token_id=tok.pad_token_id)
    AutoModelForMaskedLM.from_config(config).save_pretrained(root / "init")
    tok.save_pretrained(root / "init")
    return {"root": root, "stages": specs.Stages(root, MANIFEST, root / "hf"), "init": _safetensors(root / "init")}


def _safetensors(folder: Path | str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder, "model.safetensors")))


@pytest.fixture(scope="module")
def refs(work) -> dict[int, tuple[dict, str]]:
    return {z: work["stages"].run_with_output(f"lw-ref-z{z}", timeout=600) for z in (2, 3)}


def _checkpoint_weights(stage_dir: Path, step: int) -> dict:
    """The model's weights (without the training-only heads) in a checkpoint, consolidated from the ZeRO shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(stage_dir / "ckpt"), tag=f"step{step:08d}")
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def _group_of(name: str) -> str:
    if ".embeddings." in name:
        return "embeddings"
    if ".encoder.layer." in name:
        return f"layer{name.split('.encoder.layer.')[1].split('.')[0]}"
    return "head"


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_each_phase_trains_exactly_its_groups(work, refs, zero):
    import torch

    stage_dir = work["stages"].folder(f"lw-ref-z{zero}")
    # (step, groups that moved since the previous snapshot): 6 head; 12 + layer1; 18 + layer0; 24 + embeddings
    snapshots = [(6, {"head"}), (12, {"head", "layer1"}), (18, {"head", "layer1", "layer0"})]
    before = {k: v for k, v in work["init"].items() if not k.startswith("cls.")}  # (its MLM head is not loaded)
    for step, trained in snapshots:
        now = _checkpoint_weights(stage_dir, step)
        for name, value in before.items():
            moved = not torch.equal(now[name], value)
            group = _group_of(name)
            if group in trained:
                if value.dim() >= 1 and "LayerNorm" not in name and "bias" not in name:
                    assert moved, f"step {step}: {name} ({group}) did not train"
            else:
                assert not moved, f"step {step}: {name} ({group}) is frozen but changed"
        before = now
    final = _safetensors(refs[zero][0]["output"]["path"])
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(final[embeddings], before[embeddings])  # phase 3 trains them too
    out = refs[zero][1]
    assert out.count("layer groups:") == 4  # the start and three new phases
    assert "unfreezing phase 2 from step 12: the top 3 of 4 layer groups train" in out


def _scheduler(stage_dir: Path, step: int) -> dict:
    import torch

    folder = stage_dir / "ckpt" / f"step{step:08d}"
    rank0 = next(p for p in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
                 if (folder / p).exists())  # ZeRO 1-2, ZeRO-3
    state = torch.load(folder / rank0, weights_only=False, map_location="cpu")
    return state["lr_scheduler"]


@pytest.mark.slow
def test_killed_in_phase_2_resumes_in_phase_2_like_an_uninterrupted_run(work, refs):
    import torch

    ref, _ = refs[3]
    work["stages"].kill_after_first_checkpoint(work["stages"].spec("lw-kill-z3"), "step00000014")
    result, out = work["stages"].run_with_output("lw-kill-z3", timeout=600)
    stage_dir, ref_dir = work["stages"].folder("lw-kill-z3"), work["stages"].folder("lw-ref-z3")
    starts = specs.records(stage_dir, "start")
    assert [s["step"] for s in starts] == [0, 14], starts
    assert "resuming from step00000014" in out
    assert "unfreezing phase 2 from step 14: the top 3 of 4 layer groups train" in out  # built for phase 2
    got, want = _safetensors(result["output"]["path"]), _safetensors(ref["output"]["path"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    losses = {r["step"]: r["loss"] for r in specs.records(stage_dir, "train")}
    assert all(losses[s] == r["loss"] for s, r in ((r["step"], r) for r in specs.records(ref_dir, "train")))
    # layer-wise lr decay survives the resume: each group's rate at step 21 (phase 3) as in the uninterrupted run,
    # train.lr × schedule × DECAY^(3 - group), one decay/no-decay pair per group, embeddings first
    resumed, uninterrupted = _scheduler(stage_dir, 21), _scheduler(ref_dir, 21)
    assert resumed["_last_lr"] == uninterrupted["_last_lr"]
    assert resumed["base_lrs"] == pytest.approx([LR * DECAY ** (3 - g) for g in range(4) for _ in (0, 1)])
    phase2 = _scheduler(stage_dir, 14)["base_lrs"]  # embeddings frozen: three groups' pairs
    assert phase2 == pytest.approx([LR * DECAY ** (3 - g) for g in range(1, 4) for _ in (0, 1)])


@pytest.mark.slow
def test_deep_supervision_loss_is_the_weighted_sum_and_final_is_a_plain_classifier(work, refs):
    from transformers import AutoModelForSequenceClassification

    stage_dir = work["stages"].folder("lw-ref-z2")
    totals = {r["step"]: r["loss"] for r in specs.records(stage_dir, "train")}
    terms = specs.records(stage_dir, "loss_terms")
    assert len(terms) == STEPS // 2
    for record in terms:
        assert set(record["terms"]) == {"layer0", "layer1"}
        weighted = ALPHA[0] * record["terms"]["layer0"] + ALPHA[1] * record["terms"]["layer1"]
        assert weighted == pytest.approx(totals[record["step"]], rel=1e-6)  # the total is summed in float32
    final = refs[2][0]["output"]["path"]
    assert not any(k.startswith(("heads.", "model.")) for k in _safetensors(final))
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 8


@pytest.mark.slow
def test_deep_supervision_of_the_last_layer_alone_is_plain_classification(work):
    import torch

    plain, _ = work["stages"].run_with_output("plain-none", timeout=600)
    last, _ = work["stages"].run_with_output("plain-last-only", timeout=600)
    folder = work["stages"].folder
    assert [r["loss"] for r in specs.records(folder("plain-last-only"), "train")] == \
        [r["loss"] for r in specs.records(folder("plain-none"), "train")]
    assert not specs.records(folder("plain-last-only"), "loss_terms")
    got, want = _safetensors(last["output"]["path"]), _safetensors(plain["output"]["path"])
    assert all(torch.equal(got[k], want[k]) for k in want)
