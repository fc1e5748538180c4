"""eval.best and eval.patience for real: torchrun, 2 gloo ranks, DeepSpeed ZeRO-2 on a tiny BERT classifier.

The stage evaluates and checkpoints every step. Its best is the *largest* eval_loss: a metric the test can
predict, since training lowers eval_loss from its first steps, so the best comes early and the evals after it
do not beat it, which ends the stage by early stopping. Every expectation is read from the stage's own eval
records, not assumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.stages import specs

pytestmark = pytest.mark.slow

MAX_STEPS, PATIENCE = 30, 4


def best_stage(name: str) -> str:
    return f"""
  - name: {name}
    kind: classify
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero2}}
    data: {{train: data/supersense_train.jsonl, eval: data/supersense_eval.jsonl, max_length: 32}}
    train: {{max_steps: {MAX_STEPS}, micro_batch_size: 4, lr: 1.0e-3, warmup_steps: 2, log_every: 1}}
    checkpoint: {{every_steps: 1, keep_last: {MAX_STEPS}}}
    eval: {{every_steps: 1, best: {{metric: eval_loss, mode: max}}, patience: {PATIENCE}}}"""


MANIFEST = specs.head("best") + best_stage("best-ref") + best_stage("best-kill") + "\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("best")
    specs.copy_data(root / "data")
    stages = specs.Stages(root, MANIFEST, root / "hf")
    stages.run("tokenizer")
    return {"stages": stages, "ref": stages.run("best-ref")}


def _evals(folder: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in ("event", "time", "step")}
            for r in specs.records(folder, "eval")}


def _module(folder: Path, step: int) -> dict[str, torch.Tensor]:
    """The classifier's weights in the checkpoint of `step` (ZeRO-2 saves the whole fp32 module; classify's loss
    module holds the classifier as `model`)."""
    state = torch.load(folder / "ckpt" / f"step{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
    return {k.removeprefix("model."): v for k, v in state["module"].items() if k.startswith("model.")}


def test_final_is_the_best_evals_model_and_patience_stops_early(work):
    result = work["ref"]
    folder = Path(result["output"]["path"]).parent
    evals = _evals(folder)
    best = max(evals, key=lambda s: (evals[s]["eval_loss"], -s))  # the first of the largest
    last = max(evals)
    assert result["best_step"] == best < last == result["steps"] < MAX_STEPS
    assert last - best == PATIENCE  # every eval after the best failed to beat it, PATIENCE of them in a row
    assert result["metrics"] == evals[best] and result["last_metrics"] == evals[last]
    assert result["stopped_early"].startswith("early stopping: eval_loss has not improved on step "
                                              f"{best}'s")
    stop = specs.records(folder, "stop")
    assert [(s["step"], s["reason"]) for s in stop] == [(last, result["stopped_early"])]
    assert [r["step"] for r in specs.records(folder, "best")] == [best]

    final = load_file(str(folder / "final" / "model.safetensors"))
    at_best, at_last = _module(folder, best), _module(folder, last)
    assert final.keys() == at_best.keys()
    assert all(torch.equal(final[k], at_best[k]) for k in final)
    assert not all(torch.equal(final[k], at_last[k]) for k in final)
    assert not (folder / "best").exists() and not (folder / "final" / "best.json").exists()
    assert (folder / "final" / "tokenizer.json").is_file()


def test_killed_between_a_best_and_a_later_eval_resumes_to_the_same_choice(work):
    ref = work["ref"]
    stages = work["stages"]
    spec = stages.spec("best-kill")
    assert spec.fingerprint == stages.spec("best-ref").fingerprint  # the same settings
    folder = Path(spec.stage_dir)
    # After the best's checkpoint and one eval that did not beat it; before the evals that end the stage
    stages.kill_after_first_checkpoint(spec, tag=f"step{ref['best_step'] + 1:08d}")
    assert (folder / "best").is_dir() and not (folder / "final").exists()
    result = stages.run("best-kill", spec)
    start = specs.records(folder, "start")
    assert len(start) == 2 and start[1]["step"] > ref["best_step"], start  # resumed past the best
    for key in ("steps", "samples", "best_step", "metrics", "last_metrics", "stopped_early"):
        assert result[key] == ref[key], key
    got = load_file(str(folder / "final" / "model.safetensors"))
    want = load_file(str(Path(ref["output"]["path"]) / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert result["output"]["digest"] == ref["output"]["digest"]
