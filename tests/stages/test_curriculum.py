"""Curriculum training (`curriculum:` on mlm, clm and classify; stages/runtime/curriculum.py).

The fast tests check the schedule as a pure function of the step, the samplers built on it and the
batch-time cut. The slow ones run stages for real (torchrun, 2 gloo ranks, tiny models, log_draws on):
what each step drew, as logged from every rank, must be what the schedule says; easy-first must draw only
from the easiest pool; phase records must show the pools growing to the whole corpus; a phase's
max_length must change what the model sees; and a classify stage SIGKILLed mid-curriculum and resumed
must draw the same samples and end with bitwise the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from contract.sections import Curriculum
from tests.stages import specs

PHASES = [{"until_step": 4, "data_fraction": 0.25, "max_length": 8}, {"until_step": 8, "data_fraction": 0.5},
          {"data_fraction": 1.0}]


def curriculum(**kw) -> Curriculum:
    return Curriculum.model_validate({"phases": PHASES} | kw)


# ----------------------------------------------------------------- the schedule (fast)


def test_phases_pools_and_epochs_follow_the_manifest():
    from stages.runtime.curriculum import PHASE_EPOCHS, Schedule

    difficulty = [float((i * 37) % 11) for i in range(200)]
    s = Schedule(curriculum(order="easy_first", difficulty={"column": "d"}), 200, seed=7, global_batch=8,
                 difficulty=difficulty)
    assert [s.phase_of(step) for step in (1, 4, 5, 8, 9, 10_000)] == [0, 0, 1, 1, 2, 2]
    assert s.pools == [50, 100, 200]
    easiest = sorted(range(200), key=lambda i: (difficulty[i], i))
    assert [s.pool(k) for k in range(3)] == [easiest[:50], easiest[:100], easiest]  # nested, easiest first
    # Within a phase the stream is pass after pass over its pool: each pass a permutation of the pool.
    long = [{"until_step": 100, "data_fraction": 0.25}, {"until_step": 200, "data_fraction": 0.5}, {}]
    s_long = Schedule(curriculum(order="easy_first", difficulty={"column": "d"}, phases=long), 200, seed=7,
                      global_batch=8, difficulty=difficulty)
    for k, first in enumerate((1, 101, 201)):
        drawn = [i for step in range(first, first + 100) for i in s_long.global_batch_of(step)]
        size = s_long.pools[k]
        assert len(drawn) // size >= 4
        for e in range(len(drawn) // size):
            assert sorted(drawn[e * size:(e + 1) * size]) == sorted(s_long.pool(k))
    epochs = {epoch for step in range(1, 40) for _, epoch in s.items(step, range(8))}
    assert {e // PHASE_EPOCHS for e in epochs} == {0, 1, 2}  # every phase has epochs of its own
    assert {0, PHASE_EPOCHS, 2 * PHASE_EPOCHS, 2 * PHASE_EPOCHS + 1} <= epochs  # phase 2 begins a second pass


def test_random_order_ranks_by_a_seeded_permutation():
    from stages.runtime.curriculum import Schedule

    a = Schedule(curriculum(), 200, seed=7, global_batch=8)
    b = Schedule(curriculum(), 200, seed=8, global_batch=8)
    assert sorted(a.pool(2)) == list(range(200)) and a.pool(0) == a.pool(1)[:50]
    assert a.pool(0) != b.pool(0)
    assert [a.global_batch_of(s) for s in range(1, 20)] == \
        [Schedule(curriculum(), 200, seed=7, global_batch=8).global_batch_of(s) for s in range(1, 20)]


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2)])
def test_samplers_of_all_ranks_make_the_global_batch_and_resume_anywhere(world, accum):
    from stages.runtime.curriculum import CurriculumSampler, Schedule

    micro, logged = 2, []
    cur = curriculum()

    def samplers(step: int) -> list[CurriculumSampler]:
        s = Schedule(cur, 50, seed=3, global_batch=micro * accum * world)
        return [CurriculumSampler(50, schedule=s, step=step, log=lambda *a, **k: logged.append((a, k)), seed=3,
                                  micro_batch=micro, grad_accum=accum, world_size=world, rank=r,
                                  samples=step * micro * accum * world) for r in range(world)]

    schedule = Schedule(cur, 50, seed=3, global_batch=micro * accum * world)
    ranks = samplers(0)
    for step in range(1, 13):
        parts = [r.next_step() for r in ranks]
        assert [i for a in range(accum) for p in parts for i, _ in p[a]] == schedule.global_batch_of(step)
        assert ranks[0].max_length == PHASES[schedule.phase_of(step)].get("max_length")
        if step == 6:  # a resumed sampler, made from the step alone, goes on alike
            resumed = samplers(6)
    assert [r.next_step() for r in resumed] == [r.next_step() for r in samplers(6)]
    assert {k["first_step"] for a, k in logged if a == ("phase",)} == {1, 5, 9}  # phase starts only


def test_collate_cuts_at_batch_time_keeping_the_final_special_token():
    from stages.runtime.data import collate

    rows = {"input_ids": [[2, 10, 11, 12, 13, 3], [2, 10, 3], [10, 11, 12, 13, 14]],
            "token_type_ids": [[0, 0, 0, 1, 1, 1], [0, 0, 0], [0, 0, 0, 0, 0]], "label": [1, 2, 3]}

    class Split:
        def __getitem__(self, indices):
            return {k: [v[i] for i in indices] for k, v in rows.items()}

    batch = collate(Split(), [0, 1, 2], pad_id=0, max_length=4, ends={2, 3})
    assert batch["input_ids"].tolist() == [[2, 10, 11, 3], [2, 10, 3, 0], [10, 11, 12, 13]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert collate(Split(), [0], pad_id=0)["input_ids"].tolist() == [rows["input_ids"][0]]


def test_curriculum_is_in_the_fingerprint_but_log_draws_and_its_absence_are_not(tmp_path):
    from launcher.resolve import settings

    specs.copy_data(tmp_path / "data", pretrain_lines=40, labelled_lines=20)
    cur = "{phases: [{until_step: 2, data_fraction: 0.5}, {}]}"
    stages = specs.Stages(tmp_path, MANIFEST_HEAD + "".join(
        _classify(name, 4, c, difficulty=False) for name, c in (
            ("plain", None), ("c", cur), ("c-logged", cur.replace("]}", "], log_draws: true}")),
            ("c-other", cur.replace("0.5", "0.6"))
        )), tmp_path / "hf")
    out = {"tokenizer": {"path": str(tmp_path), "digest": "sha256:" + "0" * 64}}
    got = {n: stages.spec(n, out) for n in ("plain", "c", "c-logged", "c-other")}
    assert "curriculum" not in settings(got["plain"])  # stages without one keep their old fingerprints
    assert got["c"].curriculum is not None and got["c"].curriculum.phases[0].data_fraction == 0.5
    assert got["c"].fingerprint == got["c-logged"].fingerprint
    assert len({got[n].fingerprint for n in ("plain", "c", "c-other")}) == 3


# ----------------------------------------------------------------- stages run for real (slow)

STEPS, EVERY = 16, 6
CURRICULUM = ("{order: easy_first, difficulty: {column: hard}, log_draws: true, phases: ["
              "{until_step: 4, data_fraction: 0.25, max_length: 8}, {until_step: 8, data_fraction: 0.5}, {}]}")

MANIFEST_HEAD = specs.head("curriculum")


def _classify(name: str, steps: int, cur: str | None, *, difficulty: bool = True, every: int = EVERY,
              score: bool = False) -> str:
    train = "data/hard.jsonl" if difficulty else "data/supersense_train.jsonl"
    return f"""
  - name: {name}
    kind: classify
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero2}}
    data: {{train: {train}, max_length: 32}}
    train: {{max_steps: {steps}, micro_batch_size: 4, lr: 1.0e-3, warmup_steps: 2, log_every: 1}}
    checkpoint: {{every_steps: {every}}}
    eval: {{at_end: false{", score_train: true" if score else ""}}}""" + (f"\n    curriculum: {cur}" if cur else "")


MANIFEST = MANIFEST_HEAD + _classify("cls-ref", STEPS, CURRICULUM) + _classify("cls-kill", STEPS, CURRICULUM) + \
    _classify("cls-nocut", 9, CURRICULUM.replace(", max_length: 8", ""), every=100, score=True) + \
    _classify("cls-by-loss", 4, "{order: easy_first, difficulty: {loss_of: cls-nocut}, log_draws: true, "
              "phases: [{until_step: 2, data_fraction: 0.1}, {}]}", every=100) + f"""
  - name: mlm-length
    kind: mlm
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: 6, micro_batch_size: 4, lr: 1.0e-3}}
    eval: {{at_end: false, score_train: true}}
    curriculum: {{order: easy_first, difficulty: {{by: length}}, log_draws: true,
                 phases: [{{until_step: 3, data_fraction: 0.1, max_length: 8}}, {{}}]}}
  - name: clm-grow
    kind: clm
    init: {{config: {{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 64}}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt}}
    clm: {{block_size: 32}}
    train: {{max_steps: 6, micro_batch_size: 4, lr: 1.0e-3}}
    eval: {{at_end: false}}
    curriculum: {{log_draws: true, phases: [{{until_step: 3, data_fraction: 0.5, max_length: 16}}, {{}}]}}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("curriculum")
    files = specs.copy_data(root / "data")
    rows = [json.loads(line) for line in files["supersense_train.jsonl"].read_text().splitlines()]
    hard = [len(r["text"].split()) for r in rows]  # words per definition: many ties, broken by row index
    (root / "data" / "hard.jsonl").write_text("".join(json.dumps(r | {"hard": h}) + "\n" for r, h in zip(rows, hard)))
    stages = specs.Stages(root, MANIFEST, root / "hf")
    stages.run("tokenizer")
    return {"root": root, "stages": stages, "hard": hard}


def _draws(folder: Path) -> dict[int, list[int]]:
    """step -> every rank's indices, as the stage logged them (a replay after a kill logs a step again: last wins)."""
    return {r["step"]: r["indices"] for r in specs.records(folder, "draw")}


def _losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in specs.records(folder, "train")}


def _schedule(spec, n: int, difficulty=None):
    from stages.runtime.curriculum import Schedule

    assert spec.curriculum is not None and spec.train is not None and spec.train.global_batch_size is not None
    return Schedule(spec.curriculum, n, seed=spec.seed, global_batch=spec.train.global_batch_size,
                    difficulty=difficulty)


@pytest.fixture(scope="module")
def cls_ref(work) -> dict:
    return work["stages"].run("cls-ref")


@pytest.mark.slow
def test_classify_draws_the_schedule_easiest_first_and_grows(work, cls_ref):
    stages, hard = work["stages"], work["hard"]
    folder = stages.folder("cls-ref")
    n = len(hard)
    draws = _draws(folder)
    assert sorted(draws) == list(range(1, STEPS + 1))
    schedule = _schedule(stages.spec("cls-ref"), n, [float(h) for h in hard])
    assert all(draws[s] == schedule.global_batch_of(s) for s in draws)  # what was drawn is the pure schedule
    phases = specs.records(folder, "phase")
    assert [(p["phase"], p["first_step"], p["pool"], p["max_length"]) for p in phases] == \
        [(0, 1, 50, 8), (1, 5, 100, None), (2, 9, n, None)]  # the last pool is the whole corpus
    easiest = sorted(range(n), key=lambda i: (hard[i], i))
    for k, steps, pool in ((0, range(1, 5), 50), (1, range(5, 9), 100), (2, range(9, 17), n)):
        drawn = [i for s in steps for i in draws[s]]
        assert set(drawn) <= set(easiest[:pool]), f"phase {k} drew outside its pool"
        assert len(set(drawn)) == len(drawn)  # one pass over the pool: no repeats before it is used up
    assert max(hard[i] for s in range(1, 5) for i in draws[s]) <= hard[easiest[49]]
    late = {i for s in range(9, 17) for i in draws[s]}
    assert late - set(easiest[:100]), "the last phase drew nothing beyond the second phase's pool"


@pytest.fixture(scope="module")
def cls_nocut(work) -> dict:
    return work["stages"].run("cls-nocut")


@pytest.mark.slow
def test_phase_max_length_changes_what_the_model_sees(work, cls_ref, cls_nocut):
    """The same draws without the first phase's max_length: 8 give other losses there."""
    nocut = cls_nocut
    ref_dir, nocut_dir = work["stages"].folder("cls-ref"), Path(nocut["output"]["path"]).parent
    assert {s: d for s, d in _draws(ref_dir).items() if s <= 9} == _draws(nocut_dir)
    ref, other = _losses(ref_dir), _losses(nocut_dir)
    assert all(ref[s] != other[s] for s in range(1, 5))


@pytest.mark.slow
def test_classify_killed_mid_curriculum_resumes_bitwise(work, cls_ref):
    import torch
    from safetensors.torch import load_file

    stages = work["stages"]
    spec = stages.spec("cls-kill")
    assert spec.fingerprint == stages.spec("cls-ref").fingerprint
    stages.kill_after_first_checkpoint(spec)
    result = stages.run("cls-kill", spec)
    folder, ref_dir = Path(spec.stage_dir), stages.folder("cls-ref")
    start = specs.records(folder, "start")
    assert len(start) == 2 and start[1]["step"] == EVERY  # resumed in the second phase (steps 5-8)
    assert _draws(folder) == _draws(ref_dir)
    assert _losses(folder) == _losses(ref_dir)
    assert [p["phase"] for p in specs.records(folder, "phase")] == [0, 1, 2]  # each phase logged once
    got = load_file(str(Path(result["output"]["path"], "model.safetensors")))
    want = load_file(str(Path(cls_ref["output"]["path"], "model.safetensors")))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_mlm_by_length_and_clm_growing_pool(work):
    import torch
    from transformers import AutoTokenizer

    stages = work["stages"]
    for name in ("mlm-length", "clm-grow"):
        stages.run(name)
    # mlm: the first phase draws from the shortest 10 % of the glosses (tokens after tokenization)
    tok = AutoTokenizer.from_pretrained(stages.outputs["tokenizer"]["path"])
    lines = (work["root"] / "data" / "pretrain.txt").read_text().splitlines()
    lengths = [len(tok(line, truncation=True, max_length=32)["input_ids"]) for line in lines]
    easiest = sorted(range(len(lines)), key=lambda i: (lengths[i], i))[: math.floor(0.1 * len(lines) + 0.5)]
    draws = _draws(stages.folder("mlm-length"))
    assert all(set(draws[s]) <= set(easiest) for s in (1, 2, 3))
    assert draws == {s: _schedule(stages.spec("mlm-length"), len(lines), lengths).global_batch_of(s)
                     for s in range(1, 7)}
    # mlm with eval.score_train: each gloss's mean loss over its masked tokens, masked as the eval split is
    from transformers import AutoModelForMaskedLM

    from stages.runtime.masking import EVAL_EPOCH, Masker

    final = stages.folder("mlm-length") / "final"
    losses = json.loads((final / "train_losses.json").read_text())["losses"]
    model = AutoModelForMaskedLM.from_pretrained(final).eval()
    masker = Masker(tok, 0.15, stages.spec("mlm-length").seed)
    for i in (0, 7, 123):
        batch = {k: v for k, v in tok(lines[i], truncation=True, max_length=32, return_tensors="pt").items()
                 if k != "token_type_ids"}
        masker(batch, [(i, EVAL_EPOCH)])
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits
        assert abs(float(torch.nn.functional.cross_entropy(logits[0], labels[0])) - losses[i]) < 1e-4
    # clm: blocks, a random half of them first, then all
    phases = specs.records(stages.folder("clm-grow"), "phase")
    blocks = phases[0]["examples"]
    assert [(p["pool"], p["max_length"]) for p in phases] == [(math.floor(blocks / 2 + 0.5), 16), (blocks, None)]
    schedule = _schedule(stages.spec("clm-grow"), blocks)
    assert _draws(stages.folder("clm-grow")) == {s: schedule.global_batch_of(s) for s in range(1, 7)}


@pytest.mark.slow
def test_easy_first_by_an_earlier_stages_training_losses(work, cls_nocut):
    """cls-nocut (eval.score_train) writes each training example's loss under its final model into final/;
    cls-by-loss (difficulty: {loss_of: cls-nocut}) draws its first phase from the lowest-loss tenth."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    stages = work["stages"]
    final = Path(cls_nocut["output"]["path"])
    scored = json.loads((final / "train_losses.json").read_text())
    rows = [json.loads(line) for line in (work["root"] / "data" / "hard.jsonl").read_text().splitlines()]
    assert scored["stage"] == "cls-nocut" and scored["examples"] == len(rows) == len(scored["losses"])
    # The same losses, recomputed here from final/ one example at a time
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    with torch.no_grad():
        want = [float(F.cross_entropy(model(**tok(r["text"], truncation=True, max_length=32, return_tensors="pt"))
                                      .logits, torch.tensor([model.config.label2id[r["label"]]])))
                for r in rows]
    assert max(abs(a - b) for a, b in zip(scored["losses"], want)) < 1e-4
    assert specs.records(stages.folder("cls-nocut"), "train_losses")[0]["examples"] == len(rows)

    spec = stages.spec("cls-by-loss")
    assert spec.ref("difficulty").digest == cls_nocut["output"]["digest"]  # in the fingerprint, like any input
    stages.run("cls-by-loss", spec)
    easiest = sorted(range(len(rows)), key=lambda i: (want[i], i))[: math.floor(0.1 * len(rows) + 0.5)]
    draws = _draws(stages.folder("cls-by-loss"))
    assert set(draws[1] + draws[2]) <= set(easiest)
    assert draws == {s: _schedule(spec, len(rows), scored["losses"]).global_batch_of(s) for s in range(1, 5)}
