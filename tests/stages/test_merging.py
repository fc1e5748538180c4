"""Merges (`ensemble` methods task_arithmetic, ties, dare, slerp): each against a direct implementation of its paper's
formula and against mergekit (a test-only dependency) on tiny tensors and tiny saved models (fast); the stage for
real on two sft fine-tunes of one causal LM, its final/ against mergekit's merge of the same folders (slow: torchrun,
2 gloo ranks, tiny GPT-2s).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from stages.runtime import merging
from tests.stages import specs


def members(seed: int = 0, shape: tuple[int, ...] = (6, 5), n: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


# ----------------------------------------------------------------- the papers' formulas (fast)


def test_task_arithmetic_is_the_base_plus_the_scaled_task_vectors() -> None:
    """Ilharco et al. (2023): θ = θ_base + λ Σ_i τ_i, τ_i = θ_i − θ_base (λ as each member's weight)."""
    base, thetas = members()
    tau = [t - base for t in thetas]
    out = merging.task_vectors("task_arithmetic", base, thetas, weights=[0.4] * 3, densities=[1] * 3,
                               normalize=False, rescale=False)
    assert torch.allclose(out, base + 0.4 * sum(tau), atol=1e-6)
    mean = merging.task_vectors("task_arithmetic", base, thetas, weights=[1, 2, 3], densities=[1] * 3,
                                normalize=True, rescale=False)
    assert torch.allclose(mean, base + (tau[0] + 2 * tau[1] + 3 * tau[2]) / 6, atol=1e-6)


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean() -> None:
    """Yadav et al. (2023), Algorithm 1, entry by entry: keep each τ_i's top-k% magnitudes, γ = sgn(Σ τ̂_i), and
    τ_m = the mean of the τ̂_i whose sign is γ; θ = θ_base + τ_m."""
    base, thetas = members(1, (4, 10))
    density = 0.3
    trimmed = []
    for t in thetas:
        tau = (t - base).flatten()
        k = int(density * tau.numel())
        cut = tau.abs().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(tau.abs() >= cut, tau, 0))
    expected = torch.empty(base.numel())
    for p in range(base.numel()):
        values = [float(t[p]) for t in trimmed]
        gamma = 1.0 if sum(values) >= 0 else -1.0
        agree = [v for v in values if v != 0 and math.copysign(1, v) == gamma]
        expected[p] = sum(agree) / len(agree) if agree else 0.0
    out = merging.task_vectors("ties", base, thetas, weights=[1] * 3, densities=[density] * 3, normalize=True,
                               rescale=False)
    assert torch.allclose(out, base + expected.view_as(base), atol=1e-6)


def test_dare_drops_at_random_and_rescales() -> None:
    """Yu et al. (2023): m ~ Bernoulli(p) drops, τ̃ = (1 − m) ⊙ τ, rescaled; here p = 1 − density and the kept
    entries are scaled so that τ̃ keeps τ's L1 norm (mergekit's rescale; the paper's 1 / (1 − p) keeps it in
    expectation). Then task arithmetic."""
    base, thetas = members(2, (50, 40), n=2)
    density = 0.25
    g = [merging.generator(7, i, "w") for i in range(2)]
    keep = [torch.bernoulli(torch.full(base.shape, density), generator=merging.generator(7, i, "w")) for i in range(2)]
    expected = base.clone()
    for t, m in zip(thetas, keep, strict=True):
        tau = t - base
        kept = tau * m
        expected += 0.5 * kept * (tau.abs().sum() / kept.abs().sum())
    out = merging.task_vectors("dare", base, thetas, weights=[0.5, 0.5], densities=[density] * 2, normalize=False,
                               rescale=True, generators=g)
    assert torch.allclose(out, expected, atol=1e-6)
    kept_share = float(sum(m.mean() for m in keep) / 2)
    assert abs(kept_share - density) < 0.03  # a Bernoulli draw at the density (2000 entries each)
    # the rescale factor is about the paper's 1 / (1 − p)
    tau = thetas[0] - base
    assert abs(float(tau.abs().sum() / (tau * keep[0]).abs().sum()) - 1 / density) < 0.4


def test_dare_is_seeded_by_the_stage_seed_alone() -> None:
    base, thetas = members(3, (20, 20), n=2)
    state = lambda t: {"w": t, "ids": torch.arange(3)}  # noqa: E731
    run = lambda seed: merging.merge("dare", [state(t) for t in thetas], state(base), weights=[1, 1],  # noqa: E731
                                     densities=[0.5, 0.5], normalize=False, rescale=True, t=0.5, seed=seed)
    assert torch.equal(run(1)["w"], run(1)["w"])
    assert not torch.equal(run(1)["w"], run(2)["w"])
    assert torch.equal(run(1)["ids"], torch.arange(3))


def test_slerp_follows_the_great_circle() -> None:
    """θ(t) = sin((1 − t)Ω) / sin Ω · a + sin(tΩ) / sin Ω · b, cos Ω = â · b̂, each tensor one vector; parallel
    tensors: linear interpolation."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    t = 0.3
    omega = torch.acos(torch.dot(a.flatten() / a.norm(), b.flatten() / b.norm()))
    expected = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    assert torch.allclose(merging.slerp(t, a, b), expected, atol=1e-6)
    assert torch.allclose(merging.slerp(t, a, 2.5 * a), (1 - t) * a + t * 2.5 * a, atol=1e-6)
    assert torch.equal(merging.slerp(0.0, a, b), a)


def test_integer_tensors_must_be_equal() -> None:
    base = {"ids": torch.arange(4), "w": torch.zeros(2)}
    other = {"ids": torch.arange(4) + 1, "w": torch.ones(2)}
    with pytest.raises(ValueError, match="ids: a non-floating tensor that differs"):
        merging.merge("ties", [base, other], base, weights=[1, 1], densities=[1, 1], normalize=True, rescale=False,
                      t=0.5, seed=0)


# ----------------------------------------------------------------- mergekit as the oracle (fast)


@pytest.mark.parametrize(("method", "name", "normalize", "rescale"), [
    ("task_arithmetic", "task_arithmetic", False, False), ("task_arithmetic", "task_arithmetic", True, False),
    ("ties", "ties", True, False), ("ties", "ties", False, True), ("dare", "dare_linear", False, True),
    ("dare", "dare_linear", True, False)])
def test_task_vector_merges_are_mergekits(method: str, name: str, normalize: bool, rescale: bool) -> None:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    base, thetas = members(5, (16, 12))
    weights, densities = [0.7, 0.4, 1.2], [0.5, 0.3, 0.9]
    params = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0,
              "weight": dict(enumerate(weights, 1)), "density": dict(enumerate(densities, 1))}
    torch.manual_seed(11)  # dare: mergekit draws from torch's generator, member after member
    expected = registry.get(name).merge_group(TensorGroup.from_tensors([base, *thetas], base_index=0), **params)
    shared = torch.Generator().manual_seed(11)
    out = merging.task_vectors(method, base, thetas, weights=weights, densities=densities, normalize=normalize,
                               rescale=rescale, generators=[shared] * 3)
    assert (out - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("shape", [(7, 5), (9,), (2, 3, 4)])
def test_slerp_is_mergekits(shape: tuple[int, ...]) -> None:
    from mergekit.merge_methods.slerp import slerp

    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    # mergekit-yaml hands its slerp each tensor whole, as one row
    theirs = slerp(torch.tensor(0.35), a.reshape(1, -1), b.reshape(1, -1)).view(shape)
    assert (merging.slerp(0.35, a, b) - theirs).abs().max() <= 1e-6


def mergekit_merge(out: Path, method: str, folders: list[Path], base: Path | None, member_parameters: list[dict],
                   parameters: dict[str, Any]) -> dict[str, torch.Tensor]:
    """mergekit-yaml's merge of saved models (in process), as its state dict."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    config = {"merge_method": method, "dtype": "float32", "parameters": parameters,
              "models": [{"model": str(f), "parameters": p} for f, p in zip(folders, member_parameters, strict=True)]}
    if base is not None:
        config["base_model"] = str(base)
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return load_file(out / "model.safetensors")


def close_to(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def tiny_gpt2s(tmp_path_factory) -> Path:
    """A tiny GPT-2 (base) and two perturbed copies (a, b), saved."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=60)
    base = GPT2LMHeadModel(config)
    base.save_pretrained(root / "base")
    for name in ("a", "b"):
        model = GPT2LMHeadModel(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(root / name)
    return root


@pytest.mark.parametrize(("method", "ours", "theirs"), [
    ("task_arithmetic", {"weights": [0.6, 0.3]}, ({"weight": 0.6}, {"weight": 0.3}, {})),
    ("ties", {"weights": [1.0, 0.5], "densities": [0.4, 0.7]},
     ({"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.7}, {})),
    ("slerp", {"t": 0.3}, ({}, {}, {"t": 0.3})),
])
def test_merges_of_saved_models_are_mergekit_yamls(tiny_gpt2s: Path, tmp_path: Path, method: str,
                                                   ours: dict[str, Any], theirs: tuple[dict, dict, dict]) -> None:
    from safetensors.torch import load_file

    state = {n: load_file(tiny_gpt2s / n / "model.safetensors") for n in ("base", "a", "b")}
    n = 2
    options = {"weights": [1.0] * n, "densities": [1.0] * n, "normalize": method == "ties", "rescale": False,
               "t": 0.5} | ours
    out = merging.merge(method, [state["a"], state["b"]], None if method == "slerp" else state["base"], seed=0,
                        **options)
    slerp = method == "slerp"  # mergekit's slerp goes from its base model (t = 0) to the other
    expected = mergekit_merge(tmp_path / "out", method, [tiny_gpt2s / "a", tiny_gpt2s / "b"],
                              tiny_gpt2s / ("a" if slerp else "base"), list(theirs[:2]), theirs[2])
    close_to(out, expected)


# ----------------------------------------------------------------- the stage (slow)

LABELS = "[animal, artifact, body, food, location, person, plant, substance]"
TINY_GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 96}"
SFT = """
  - name: {name}
    kind: sft
    init: {{from: base}}
    seed: {seed}
    deepspeed: {{config: zero1}}
    data: {{train: data/sft_train.jsonl, eval: data/sft_eval.jsonl, max_length: 64}}
    sft: {{max_new_tokens: 3, label_set: {labels}}}
    train: {{max_steps: 6, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 1, log_every: 3}}"""
MERGE = """
  - name: {name}
    kind: ensemble
    members: {members}{base}
    data: {{eval: data/sft_eval.jsonl, max_length: 64}}
    ensemble: {{task: sft, head: {{max_new_tokens: 3, label_set: {labels}}}, batch_size: 8, {options}}}"""
MERGES = {
    "task-arith": ("[{from: a}, {from: b}]", True, "method: task_arithmetic, weights: [0.6, 0.3]"),
    "ties": ("[{from: a}, {from: b}]", True, "method: ties, densities: [0.4, 0.7]"),
    "dare": ("[{from: a}, {from: b}]", True, "method: dare, densities: [0.5, 0.5]"),
    "slerp": ("[{from: a}, {from: b}]", False, "method: slerp, t: 0.3"),
    "logits": ("[{from: a}, {from: a}]", False, "method: logits"),
}
MANIFEST = specs.head("merging") + f"""
  - name: base
    kind: clm
    init: {{config: {TINY_GPT2}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt}}
    clm: {{block_size: 64}}
    train: {{max_steps: 4, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 1}}""" + "".join(
    SFT.format(name=n, seed=s, labels=LABELS) for n, s in (("a", 1), ("b", 2))) + "".join(
    MERGE.format(name=n, members=m, base="\n    base: {from: base}" if b else "", options=o, labels=LABELS)
    for n, (m, b, o) in MERGES.items()) + "\n"


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> specs.Stages:
    root = tmp_path_factory.mktemp("merging")
    specs.copy_data(root / "data")
    for split, n in (("train", 120), ("eval", 21)):
        lines = (specs.WORDNET / f"sft_{split}.jsonl").read_text().splitlines()[:n]
        (root / "data" / f"sft_{split}.jsonl").write_text("\n".join(lines) + "\n")
    stages = specs.Stages(root, MANIFEST, root / "hf")
    for name in ("tokenizer", "base", "a", "b"):
        stages.run(name)
    return stages


def final(stages: specs.Stages, name: str) -> Path:
    return stages.folder(name) / "final"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method", "theirs"), [
    ("task-arith", "task_arithmetic", ({"weight": 0.6}, {"weight": 0.3}, {})),
    ("ties", "ties", ({"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.7}, {})),
    ("slerp", "slerp", ({}, {}, {"t": 0.3})),
])
def test_the_stage_merges_as_mergekit_does(chain: specs.Stages, tmp_path: Path, name: str, method: str,
                                           theirs: tuple[dict, dict, dict]) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = chain.run(name)
    merged = load_file(final(chain, name) / "model.safetensors")
    slerp = method == "slerp"
    expected = mergekit_merge(tmp_path / "mk", method, [final(chain, "a"), final(chain, "b")],
                              final(chain, "a" if slerp else "base"), list(theirs[:2]), theirs[2])
    close_to(merged, expected)
    m = out["metrics"]
    for metric in ("eval_loss", "perplexity", "exact_match", "accuracy"):
        assert metric in m and f"member/a/{metric}" in m and f"member/b/{metric}" in m
        assert (f"base/{metric}" in m) == (not slerp)
    a = json.loads((chain.folder("a") / "result.json").read_text())["metrics"]
    assert m["member/a/eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)  # the member scored as its stage did
    AutoModelForCausalLM.from_pretrained(final(chain, name))  # one ordinary model


@pytest.mark.slow
def test_dare_in_the_stage_is_seeded_and_reruns_to_the_same_tensors(chain: specs.Stages) -> None:
    from safetensors.torch import load_file

    chain.run("dare")
    first = load_file(final(chain, "dare") / "model.safetensors")
    chain.run("dare")  # runs again: recomputed from scratch
    again = load_file(final(chain, "dare") / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    spec = chain.spec("dare")
    state = {n: load_file(final(chain, n) / "model.safetensors") for n in ("base", "a", "b")}
    expected = merging.merge("dare", [state["a"], state["b"]], state["base"], weights=[1.0, 1.0],
                             densities=[0.5, 0.5], normalize=False, rescale=True, t=0.5, seed=spec.seed)
    close_to(first, expected)
    # half of each task vector dropped: the merge is neither member nor their plain sum
    plain = merging.merge("task_arithmetic", [state["a"], state["b"]], state["base"], weights=[1.0, 1.0],
                          densities=[1.0, 1.0], normalize=False, rescale=False, t=0.5, seed=0)
    assert any(not torch.allclose(first[k], plain[k], atol=1e-6) for k in first)


@pytest.mark.slow
def test_logits_ensemble_of_causal_lms_averages_next_token_probabilities(chain: specs.Stages) -> None:
    """Two copies of one member: the average of its probabilities is its own, so the ensemble's per-token loss is
    the member's."""
    from stages.runtime.ensemble import load

    out = chain.run("logits")
    m = out["metrics"]
    assert set(k for k in m if "/" not in k) == {"eval_loss", "perplexity"}  # no generation from an average
    assert m["eval_loss"] == pytest.approx(m["member/0/eval_loss"], abs=1e-5)
    assert m["member/0/eval_loss"] == m["member/1/eval_loss"]
    ensemble = load(final(chain, "logits"))
    manifest = json.loads((final(chain, "logits") / "ensemble.json").read_text())
    assert manifest["task"] == "sft" and manifest["labels"] is None
    ids = torch.tensor([[5, 9, 13, 2]])
    with torch.no_grad():
        combined = ensemble(input_ids=ids)
        own = ensemble.members[0](input_ids=ids).logits.log_softmax(-1)
    assert combined.shape == own.shape and torch.allclose(combined, own, atol=1e-5)


def test_tied_tensors_are_merged_once() -> None:
    """A model's state_dict names a tied embedding twice; DARE draws for it once, so both names get one tensor."""
    base, (a, b) = members(8, (10, 4), n=2)
    state = lambda t: {"wte": t, "lm_head": t}  # noqa: E731  # one tensor under two names, as tied weights are
    out = merging.merge("dare", [state(a), state(b)], state(base), weights=[1, 1], densities=[0.5, 0.5],
                        normalize=False, rescale=True, t=0.5, seed=3)
    assert torch.equal(out["wte"], out["lm_head"])
    alone = merging.merge("dare", [{"wte": a}, {"wte": b}], {"wte": base}, weights=[1, 1], densities=[0.5, 0.5],
                          normalize=False, rescale=True, t=0.5, seed=3)
    assert torch.equal(out["wte"], alone["wte"])
