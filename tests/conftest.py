"""Shared fixtures: the real CLI as a subprocess, small copies of the shipped WordNet data,
and trained runs that the heavy tests share (each trained once per session, whatever the workers)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
WORDNET = ROOT / "examples" / "data" / "wordnet"


TIER_ORDER = ("slurm", "e2e", "slow")  # the longest tiers first


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of the longest tiers first: `--dist loadfile` hands whole files to the workers in this
    order, so a long Slurm or end-to-end file started last would leave one worker alone at the end."""
    def tier(item: pytest.Item) -> int:
        return min((TIER_ORDER.index(m.name) for m in item.iter_markers() if m.name in TIER_ORDER),
                   default=len(TIER_ORDER))

    rank: dict[str, int] = {}
    for item in items:
        rank[item.nodeid.split("::")[0]] = min(rank.get(item.nodeid.split("::")[0], len(TIER_ORDER)), tier(item))
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def hf_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for every subprocess: offline, caches in a temp folder."""
    home = tmp_path_factory.mktemp("hf_home")
    env = dict(os.environ)
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    os.environ.update({k: env[k] for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")})
    return env


def baton(*args: str | Path, env: dict[str, str], cwd: Path | None = None, timeout: float = 600,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `baton` CLI; fail with its output when `check` and the exit code is not 0."""
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"baton {' '.join(map(str, args))} -> {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def cli_in_process(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI's `main` in this process, from `cwd`, its output captured: what `baton ARGV` would exit with and print
    (an exception it lets through is its traceback on stderr and exit 1, as the interpreter would make it). The
    imports are paid once per test process; `tests/test_manifest_errors.py::test_the_cli_process_exits_2_with_one_line`
    runs the real process."""
    from launcher import cli as baton_cli

    out, err, before = io.StringIO(), io.StringIO(), Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = baton_cli.main(argv)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["baton", *argv], code, out.getvalue(), err.getvalue())


def write_data(folder: Path, pretrain_lines: int = 3000, per_class: int = 30) -> Path:
    """Small copies of the shipped WordNet files: pretraining text and a balanced labelled set."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    lines = (WORDNET / "pretrain.txt").read_text().splitlines()
    (folder / "pretrain.txt").write_text("\n".join(lines[:pretrain_lines]) + "\n")
    (folder / "pretrain_eval.txt").write_text("\n".join(lines[pretrain_lines:pretrain_lines + 200]) + "\n")
    for split, limit in (("train", per_class), ("eval", per_class // 2)):
        rows, counts = [], {}
        for line in (WORDNET / f"supersense_{split}.jsonl").read_text().splitlines():
            label = json.loads(line)["label"]
            if counts.get(label, 0) < limit:
                counts[label] = counts.get(label, 0) + 1
                rows.append(line)
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


TINY_BERT = """      config:
        model_type: bert
        hidden_size: 32
        num_hidden_layers: 2
        num_attention_heads: 2
        intermediate_size: 64
        max_position_embeddings: 64"""


def pipeline_manifest(*, pretrain_lr: str = "1.0e-3", finetune_lr: str = "5.0e-4", zero: str = "zero2") -> str:
    return f"""version: 1
run: {{name: tiny}}
defaults:
  launcher: {{nproc_per_node: 2}}
  deepspeed: {{config: {zero}}}
  seed: 7
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: data/pretrain.txt}}
    sentencepiece: {{vocab_size: 600}}
  - name: pretrain
    kind: mlm
    init:
{TINY_BERT}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt, eval: data/pretrain_eval.txt, max_length: 32}}
    train: {{max_steps: 24, micro_batch_size: 16, lr: {pretrain_lr}, warmup_steps: 4}}
    checkpoint: {{every_steps: 8, keep_last: 2}}
  - name: finetune
    kind: classify
    init: {{from: pretrain}}
    data: {{train: data/train.jsonl, eval: data/eval.jsonl, max_length: 32}}
    train: {{max_steps: 16, micro_batch_size: 8, lr: {finetune_lr}}}
    checkpoint: {{every_steps: 8}}
"""


def gates_manifest(slurm: str = "") -> str:
    """A run that takes every kind of decision with real stages: pretrain's gate fails at lr 1e-9 (nothing learnt:
    eval_loss ln 600 = 6.4) and passes on the retry at 2e-3 (6.0); two finetune variants, the lower eval_loss goes
    on; prune's gate asks what pruning cannot give (eval_loss 1 below its upstream's), so finetune's model goes on
    to `last`, whose gate passes at once (its retry is never needed). A shared eval set scores every classifier.
    `slurm`: a defaults.slurm section, for `baton submit`. One process a stage, the global batch made up by
    grad_accum: the decisions do not depend on the world size, and a stage's start-up costs half as much."""
    return f"""version: 1
run: {{name: gates}}
defaults:
  launcher: {{nproc_per_node: 1}}
  seed: 7
{slurm}
evals:
  heldout: {{task: classify, eval: data/eval.jsonl, max_length: 32}}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: data/pretrain.txt}}
    sentencepiece: {{vocab_size: 600}}
  - name: pretrain
    kind: mlm
    init:
{TINY_BERT}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt, eval: data/pretrain_eval.txt, max_length: 32}}
    train: {{max_steps: 20, micro_batch_size: 16, grad_accum: 2, lr: 1.0e-9}}
    checkpoint: {{every_steps: 4, keep_last: 2}}
    gate:
      require: eval_loss <= 6.2
      on_fail: retry
      retries: [{{train.lr: 2.0e-3}}]
  - name: finetune
    kind: classify
    init: {{from: pretrain}}
    data: {{train: data/train.jsonl, eval: data/eval.jsonl, max_length: 32}}
    train: {{max_steps: 8, micro_batch_size: 8, grad_accum: 2}}
    variants:
      grid: {{train.lr: [1.0e-5, 2.0e-3]}}
      select: {{min: eval_loss}}
  - name: prune
    kind: prune
    init: {{from: finetune}}
    data: {{train: data/train.jsonl, eval: data/eval.jsonl, max_length: 32}}
    prune: {{task: classify, ffn: 0.25, importance: magnitude}}
    gate: {{require: eval_loss <= upstream.eval_loss - 1, on_fail: fallback, fallback: finetune}}
  - name: last
    kind: classify
    init: {{from: prune}}
    data: {{train: data/train.jsonl, eval: data/eval.jsonl, max_length: 32}}
    train: {{max_steps: 4, micro_batch_size: 8, grad_accum: 2}}
    gate: {{require: "heldout/accuracy >= 0", on_fail: retry, retries: [{{seed: 8}}]}}
"""


def expected_decisions(led: dict[str, Any]) -> dict[str, Any]:
    """Check a run of `gates_manifest` took the decisions it was made to take (and that each follows from the
    recorded metrics); return them without their times, to compare runs by."""
    stages, decided = led["stages"], led["decisions"]
    assert [(e["attempt"], e["action"]) for e in decided["pretrain"]["events"]] == [
        ("pretrain", "retry"), ("pretrain@2", "pass")]
    select = decided["finetune"]["events"][0]
    values = {n: stages[n]["metrics"]["eval_loss"] for n in ("finetune@v1", "finetune@v2")}
    assert select["values"] == values and select["chosen"] == min(values, key=lambda n: values[n])
    assert decided["prune"]["outcome"] == "fallback" and decided["prune"]["hand_on"] == select["chosen"]
    assert decided["last"]["outcome"] == "pass" and decided["last"]["hand_on"] == "last"
    init = stages["last"]["inputs"]["init"]
    assert (init["stage"], init["named"], init["digest"]) == (select["chosen"], "prune",
                                                              stages[select["chosen"]]["output"]["digest"])
    for name in ("finetune@v1", "finetune@v2", "prune", "last"):  # the shared eval set scores every classifier
        assert "heldout/accuracy" in stages[name]["metrics"], name
    assert not any(k.startswith("heldout/") for k in stages["pretrain@2"]["metrics"])
    return {name: timeless(rec["events"]) for name, rec in decided.items()}


def timeless(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A decision's events without their times: what two runs of one manifest must agree on."""
    return [{k: v for k, v in e.items() if k != "time"} for e in events]


def built_once(tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str,
               build: Callable[[Path], str]) -> tuple[Path, str]:
    """A folder that every test worker of this session shares: the first worker to ask builds it with `build(folder)`
    (which returns text to keep, e.g. what the run printed) while the others wait on a lock; the rest read it. A run
    trained once for the whole session, not once per worker. Nothing may change what it holds."""
    base = tmp_path_factory.getbasetemp()
    base = base if worker_id == "master" else base.parent  # under xdist: pytest-N/, above each popen-gwK/
    folder, kept = base / name, base / f"{name}.built"
    with FileLock(base / f"{name}.lock"):
        if not kept.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            kept.write_text(build(folder))
    return folder, kept.read_text()


@pytest.fixture(scope="session")
def gates_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str, hf_env: dict[str, str]) -> dict[str, Any]:
    """`gates_manifest` run by `baton run`: the decisions (and weights) other runs of it must take (and end on)."""
    def build(root: Path) -> str:
        write_data(root / "data")
        (root / "gates.yaml").write_text(gates_manifest())
        return baton("run", root / "gates.yaml", "--run-dir", root / "run", env=hf_env).stdout

    root, out = built_once(tmp_path_factory, worker_id, "gates", build)
    return {"root": root, "manifest": root / "gates.yaml", "run_dir": root / "run", "out": out}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str, hf_env: dict[str, str]) -> dict[str, Any]:
    """One trained tokenizer → mlm → classify run (ZeRO-2, 2 processes), shared by the heavy tests."""
    def build(root: Path) -> str:
        write_data(root / "data")
        (root / "tiny.yaml").write_text(pipeline_manifest())
        proc = baton("run", root / "tiny.yaml", "--run-dir", root / "run", env=hf_env)
        return proc.stdout + proc.stderr

    root, terminal = built_once(tmp_path_factory, worker_id, "tiny", build)
    return {"root": root, "manifest": root / "tiny.yaml", "run_dir": root / "run", "terminal": terminal}


@pytest.fixture(scope="session", autouse=True)
def baton_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """baton's record of model checks that passed (launcher/modelcheck.py): one per test session, not the
    user's, so every check a test expects is made; the subprocesses of the session inherit it."""
    folder = tmp_path_factory.mktemp("baton_cache")
    os.environ["BATON_CACHE_DIR"] = str(folder)
    return folder

