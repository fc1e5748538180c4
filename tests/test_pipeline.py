"""The quickstart-shaped pipeline end to end: tokenizer → mlm → classify under torchrun + ZeRO-2.

All tests share one trained run (the `tiny_run` fixture); the ones that change the
manifest run last, on their own copy of the run folder.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from contract.files import dir_digest, file_digest
from tests.conftest import baton, pipeline_manifest

pytestmark = pytest.mark.e2e


def ledger(run_dir: Path) -> dict:
    return json.loads((run_dir / "ledger.json").read_text())


def test_every_stage_done_with_lineage_matching_the_files(tiny_run: dict[str, Path], hf_env: dict[str, str]) -> None:
    run_dir = tiny_run["run_dir"]
    stages = ledger(run_dir)["stages"]
    assert list(stages) == ["tokenizer", "pretrain", "finetune"]
    for name, entry in stages.items():
        assert entry["state"] == "done", name
        final = run_dir / "stages" / name / "final"
        assert entry["output"]["path"] == str(final)
        assert entry["output"]["digest"] == dir_digest(final), f"{name}: ledger digest differs from final/"
        for path, digest in entry["inputs"]["data"].items():
            assert digest == file_digest(path)
        # what the launcher knows (package metadata) and what the stage reported it ran on
        attempt = entry["attempts"][-1]
        assert attempt["versions"]["torch"] and attempt["host"]
        import torch

        assert attempt["stage_environment"]["torch"] == torch.__version__
        assert attempt["stage_environment"]["cuda"] == torch.version.cuda
    # each stage was fed exactly the output its upstream recorded
    assert stages["pretrain"]["inputs"]["tokenizer"]["digest"] == stages["tokenizer"]["output"]["digest"]
    assert stages["finetune"]["inputs"]["init"]["digest"] == stages["pretrain"]["output"]["digest"]
    assert stages["finetune"]["inputs"]["tokenizer"]["digest"] == stages["pretrain"]["output"]["digest"]
    text = baton("lineage", run_dir, env=hf_env).stdout
    assert "STALE" not in text and text.count("(ok)") == 3
    status = baton("status", run_dir, env=hf_env).stdout
    assert "accuracy" in status and status.count(" done ") == 3
    st = json.loads(baton("status", run_dir, "--json", env=hf_env).stdout)
    assert [(s["name"], s["state"], s["output"]) for s in st["stages"]] == [
        (n, "done", e["output"]["digest"]) for n, e in stages.items()]
    assert st["stages"][1]["progress"]["max_steps"] == st["stages"][1]["steps"] == 24


def test_final_model_gives_the_logits_the_engine_gave(tiny_run: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tiny_run["run_dir"] / "stages" / "finetune"
    model = AutoModelForSequenceClassification.from_pretrained(folder / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "final")
    rows = [json.loads(line) for line in (tiny_run["root"] / "data" / "eval.jsonl").read_text().splitlines()]
    predictions = [json.loads(line) for line in (folder / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows)
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    expected = torch.tensor([p["logits"] for p in predictions])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert logits.argmax(-1).tolist() == [p["pred"] for p in predictions]


def test_dry_run_prints_the_plan_and_launches_nothing(tiny_run: dict[str, Path], hf_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    out = baton("run", tiny_run["manifest"], "--run-dir", fresh, "--dry-run", env=hf_env).stdout
    assert "torch.distributed.run" in out and "-m stages.mlm" in out and "--nproc-per-node 2" in out
    assert not (fresh / "ledger.json").exists()
    out = baton("run", tiny_run["manifest"], "--run-dir", tiny_run["run_dir"], "--dry-run", env=hf_env).stdout
    assert out.count("SKIP: done, unchanged") == 3


def test_rerun_is_a_no_op(tiny_run: dict[str, Path], hf_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"  # a copy: the shared run is read by other workers' tests meanwhile
    shutil.copytree(tiny_run["run_dir"], run_dir)
    before = (run_dir / "ledger.json").read_text()
    t0 = time.monotonic()
    out = baton("run", tiny_run["manifest"], "--run-dir", run_dir, env=hf_env).stdout
    print(f"no-op rerun took {time.monotonic() - t0:.2f} s")
    assert "nothing to do" in out
    assert (run_dir / "ledger.json").read_text() == before
    assert not (run_dir / ".baton.lock").exists()


def attempts(run_dir: Path) -> dict[str, int]:
    return {name: len(e["attempts"]) for name, e in ledger(run_dir)["stages"].items()}


def test_changed_settings_rerun_that_stage_and_its_descendants_only(tiny_run: dict[str, Path],
                                                                    hf_env: dict[str, str]) -> None:
    root = tiny_run["root"]
    run_dir = root / "run-changed"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    assert attempts(run_dir) == {"tokenizer": 1, "pretrain": 1, "finetune": 1}

    changed = root / "changed-finetune.yaml"
    changed.write_text(pipeline_manifest(finetune_lr="1.0e-4"))
    plan = baton("run", changed, "--run-dir", run_dir, "--dry-run", env=hf_env).stdout
    rerun = [line for line in plan.splitlines() if "RERUN" in line]
    assert len(rerun) == 1 and rerun[0].startswith("3. finetune [classify] RERUN: changed:"), plan
    assert "train.lr 0.0005 -> 0.0001" in rerun[0]

    changed = root / "changed-pretrain.yaml"
    changed.write_text(pipeline_manifest(pretrain_lr="2.0e-3"))
    plan = baton("run", changed, "--run-dir", run_dir, "--dry-run", env=hf_env).stdout
    assert [line.split(" RERUN")[0] for line in plan.splitlines() if "RERUN" in line] == [
        "2. pretrain [mlm]", "3. finetune [classify]"], plan
    old_pretrain = ledger(run_dir)["stages"]["pretrain"]["output"]["digest"]
    baton("run", changed, "--run-dir", run_dir, env=hf_env)
    stages = ledger(run_dir)["stages"]
    assert attempts(run_dir) == {"tokenizer": 1, "pretrain": 2, "finetune": 2}
    assert stages["pretrain"]["output"]["digest"] != old_pretrain
    assert stages["finetune"]["inputs"]["init"]["digest"] == stages["pretrain"]["output"]["digest"]


def test_terminal_shows_progress_and_the_logs_keep_library_chatter(tiny_run: dict[str, Any]) -> None:
    terminal = tiny_run["terminal"]
    # not a terminal: rank 0's lines as they come, with the time and the stage, without torchrun's prefix
    assert re.search(r"^\d\d:\d\d:\d\d pretrain \| step 24/24  loss ", terminal, re.M), terminal[-3000:]
    assert re.search(r"^\d\d:\d\d:\d\d finetune \| step 16/16  loss ", terminal, re.M)
    assert "[default0]" not in terminal
    assert "== finetune: done" in terminal
    # transformers' weight-loading report (the classifier head is new) and library warnings stay in the logs
    assert "LOAD REPORT" not in terminal and "Warning" not in terminal, terminal[-3000:]
    logs = tiny_run["run_dir"] / "stages" / "finetune" / "logs"
    rank0 = [p.read_text() for p in logs.glob("attempt-1/**/0/stderr.log")]
    assert len(rank0) == 1 and "LOAD REPORT" in rank0[0] and "classifier.weight" in rank0[0]
