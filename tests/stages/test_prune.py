"""`prune`: structured pruning into a smaller model (stages/prune.py, stages/runtime/pruning.py).

The fast tests cut tiny BERT, Llama and GPT-2 models: the pruned model has the requested sizes, loads with
`from_pretrained` (no custom code) and its outputs equal a masked forward of the original on the kept
structure (pruned FFN neurons and heads zeroed at the output projection, pruned layers removed). The slow
one runs the stage under torchrun on a trained classifier: sizes, parameter counts and evals in result.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.stages import specs


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=32, num_labels=3, pad_token_id=0)).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _masked(model, f, plan):
    """The original with the pruned FFN neurons and kv groups zeroed where they enter the residual stream."""
    from stages.runtime import pruning

    shape = pruning.shape_of(model, f)
    with torch.no_grad():
        for i, layer in enumerate(pruning.layer_list(model, f)):
            if i not in plan.layers:
                continue
            j = plan.layers.index(i)
            modules = dict(layer.named_modules())
            out = modules[f.ffn_out].weight
            gone = [u for u in range(shape.ffn) if u not in plan.ffn[j]]
            if f.name == "gpt2":
                out[gone, :] = 0  # Conv1D: [in, out]
            else:
                out[:, gone] = 0
            if f.heads:
                per_group = shape.heads // shape.kv_heads
                heads = [g * per_group + h for g in range(shape.kv_heads) if g not in plan.groups[j]
                         for h in range(per_group)]
                cols = [h * shape.head_dim + r for h in heads for r in range(shape.head_dim)]
                modules[f.attn_out].weight[:, cols] = 0
    return model


@pytest.mark.parametrize("make,cut", [(_bert, {"ffn": 0.5}), (_llama, {"ffn": 0.5, "heads": 0.5}),
                                      (_gpt2, {"ffn": 0.25})])
def test_the_pruned_model_is_smaller_loads_and_equals_the_masked_original(make, cut, tmp_path):
    from transformers import AutoModel

    from stages.runtime import models, pruning

    model = make()
    f = pruning.family_of(model)
    shape = pruning.shape_of(model, f)
    plan = pruning.plan(pruning.magnitude(model, f), ffn=cut.get("ffn"), heads=cut.get("heads"), layers=None)
    pruned = pruning.apply(model, f, plan)
    assert models.parameter_count(pruned) < models.parameter_count(model)
    c = pruned.config
    assert getattr(c, f.keys["ffn"]) == pruning.keep_count(shape.ffn, cut["ffn"]) == len(plan.ffn[0])
    if "heads" in cut:
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, shape.head_dim)
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = pruned(input_ids=ids, attention_mask=mask).logits
        want = _masked(model, f, plan)(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-5)
    # a save_pretrained folder that transformers loads with no custom code, to the same outputs
    pruned.save_pretrained(tmp_path)
    loaded = type(pruned).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, got)
    assert AutoModel.from_pretrained(tmp_path).config.to_dict()[f.keys["ffn"]] == len(plan.ffn[0])


def test_layers_are_dropped_by_block_importance_and_the_rest_kept_whole():
    from stages.runtime import pruning

    model = _bert()
    f = pruning.family_of(model)
    scores = pruning.Scores(pruning.shape_of(model, f))
    scores.blocks[:] = torch.tensor([0.5, 0.1, 0.9])
    plan = pruning.plan(scores, ffn=None, heads=None, layers=2)
    assert plan.layers == [0, 2] and plan.ffn == [list(range(64))] * 2
    pruned = pruning.apply(model, f, plan)
    assert pruned.config.num_hidden_layers == 2
    del model.bert.encoder.layer[1]
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_activation_and_gradient_scores_rank_a_silenced_neuron_last():
    """A neuron whose weights are all zero never fires and moves nothing: every importance ranks it last."""
    from stages.runtime import pruning

    model = _bert()
    f = pruning.family_of(model)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.intermediate.dense.weight[5] = 0
            layer.intermediate.dense.bias[5] = 0  # GELU(0) = 0: never fires
            layer.output.dense.weight[:, 5] = 0
    ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for how in ("activation", "gradient"):
        c = pruning.Calibration(model, f, how)
        with c:
            for _ in range(2):
                def run():
                    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 0]),
                                output_hidden_states=True)
                    return out.loss, out.hidden_states
                c.batch(mask, run)
        assert all(int(c.scores.ffn[i].argmin()) == 5 for i in range(3)), how
        assert float(c.scores.tokens) == 2 * ids.numel() and bool((c.scores.blocks > 0).all())
    assert all(int(pruning.magnitude(model, f).ffn[i].argmin()) == 5 for i in range(3))


def test_heads_are_refused_where_the_head_size_derives_from_the_hidden_size():
    from stages.runtime import pruning

    assert not pruning.family_of(_bert()).heads and not pruning.family_of(_gpt2()).heads
    assert pruning.family_of(_llama()).heads


# ----------------------------------------------------------------- the stage under torchrun (slow)

MANIFEST = specs.head("prune") + f"""
  - name: cls
    kind: classify
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}}
    train: {{max_steps: 12, micro_batch_size: 8, lr: 1.0e-3}}
  - name: pruned
    kind: prune
    init: {{from: cls}}
    data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}}
    prune: {{task: classify, importance: activation, ffn: 0.5, layers: 1, calibration_batches: 2,
             micro_batch_size: 8}}
"""


@pytest.mark.slow
def test_prune_stage_cuts_a_trained_classifier_and_reports_both_evals(tmp_path):
    from transformers import AutoModelForSequenceClassification

    specs.copy_data(tmp_path / "data")
    stages = specs.Stages(tmp_path, MANIFEST, tmp_path / "hf")
    stages.run("tokenizer")
    trained = stages.run("cls")
    result = stages.run("pruned")
    final = Path(result["output"]["path"])
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert (model.config.num_hidden_layers, model.config.intermediate_size) == (1, 32)
    m = result["metrics"]
    assert m["params_after"] == sum(p.numel() for p in model.parameters()) < m["params_before"]
    assert m["before/accuracy"] == pytest.approx(trained["metrics"]["accuracy"], abs=1e-9)
    assert 0 <= m["accuracy"] <= 1 and "eval_loss" in m
    record = json.loads((final / "pruning.json").read_text())
    assert len(record["kept"]["layers"]) == 1 and all(len(k) == 32 for k in record["kept"]["ffn"])
    assert specs.records(stages.folder("pruned"), "prune")[0]["after"]["parameters"] == m["params_after"]
