"""A stage's metrics.jsonl records in TensorBoard, Weights & Biases and MLflow (stages/runtime/trackers.py).

Fast: the records → scalars mapping, report_to kept out of the fingerprint, and a tracker that fails at run time
(a real MLflow refusing its URI) dropped while TensorBoard goes on. Slow: an mlm stage under torchrun, 2 gloo ranks,
reporting to all three (W&B offline, MLflow on a file store), stopped by SIGTERM and resumed: the scalars read back
from each equal metrics.jsonl's, and the resumed attempt goes on in the same W&B and MLflow runs.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import pytest

from contract.spec import MlflowSettings, Reporting
from stages.runtime import records, trackers
from stages.runtime.trackers import scalars
from tests.stages import specs


def manifest(root: Path, report_to: str = "[tensorboard, wandb, mlflow]") -> str:
    return f"""version: 1
run:
  name: trackers
  report_to: {report_to}
  wandb: {{project: baton-test}}
  mlflow: {{tracking_uri: "file://{root}/mlruns", experiment: baton-test}}
defaults:
  launcher: {{nproc_per_node: 2}}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: data/pretrain.txt}}
    sentencepiece: {{vocab_size: 1000}}
  - name: mlm
    kind: mlm
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    deepspeed: {{config: zero1}}
    data: {{train: data/pretrain.txt, eval: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: 12, micro_batch_size: 4, lr: 1.0e-3, warmup_steps: 2, log_every: 2}}
    eval: {{every_steps: 6}}
"""


# ----------------------------------------------------------------- fast


def test_records_to_scalars():
    assert scalars({"event": "train", "step": 4, "samples": 64, "loss": 2.5, "lr": 1e-3, "tokens": 900,
                    "steps_per_s": 3.0, "tokens_per_s": 800.0, "mfu": 0.4, "time": 1.0}) == (4, {
        "train/samples": 64.0, "train/loss": 2.5, "train/lr": 1e-3, "train/tokens": 900.0, "train/steps_per_s": 3.0,
        "train/tokens_per_s": 800.0, "train/mfu": 0.4})
    assert scalars({"event": "train", "step": 6, "loss": None, "lr": 0.0, "time": 1.0}) == (6, {"train/lr": 0.0})
    assert scalars({"event": "eval", "step": 10, "time": 1.0, "eval_loss": 3.0, "sst/accuracy": 0.5,
                    "greedy/a/kept": True}) == (10, {"eval/eval_loss": 3.0, "eval/sst/accuracy": 0.5,
                                                     "eval/greedy/a/kept": 1.0})
    assert scalars({"event": "loss_terms", "step": 2, "terms": {"layer0": 1.5, "kd": 0.25}}) == (
        2, {"loss_terms/layer0": 1.5, "loss_terms/kd": 0.25})
    assert scalars({"event": "mixing", "step": 8, "tasks": [["a", "b"]], "drawn": {"a": 3, "b": 5}}) == (
        8, {"mixing/a": 3.0, "mixing/b": 5.0})
    assert scalars({"event": "phase", "phase": 1, "first_step": 61, "until_step": None, "pool": 40, "examples": 40,
                    "data_fraction": 0.5, "max_length": 16, "order": "random"}) == (61, {
        "curriculum/phase": 1.0, "curriculum/pool": 40.0, "curriculum/examples": 40.0,
        "curriculum/data_fraction": 0.5, "curriculum/max_length": 16.0})
    assert scalars({"event": "prune", "before": {"layers": 4, "accuracy": 0.9}, "after": {"layers": 2, "heads": None},
                    "importance": "magnitude", "time": 1.0}) == (None, {
        "prune/before/layers": 4.0, "prune/before/accuracy": 0.9, "prune/after/layers": 2.0})
    for event in ("start", "checkpoint", "stop", "init", "draw", "greedy", "tracker"):
        assert scalars({"event": event, "step": 3, "world_size": 2, "accuracy": 0.5}) == (None, {})


def test_report_to_is_not_in_the_fingerprint(tmp_path):
    specs.copy_data(tmp_path / "data", pretrain_lines=20, labelled_lines=20)
    made = {}
    for report_to in ("[]", "[tensorboard, wandb, mlflow]"):
        text = manifest(tmp_path, report_to).replace("baton-test", f"other-{len(report_to)}")
        made[report_to] = specs.Stages(tmp_path, text, tmp_path / "hf")
    none, every = (m.spec("tokenizer") for m in made.values())
    assert none.reporting.to == [] and every.reporting.to == ["tensorboard", "wandb", "mlflow"]
    assert every.reporting.mlflow.tracking_uri == f"file://{tmp_path}/mlruns"
    assert (none.fingerprint, none.fingerprint_any_world) == (every.fingerprint, every.fingerprint_any_world)


def test_a_failing_tracker_is_dropped_and_the_others_go_on(tmp_path, capsys):
    """A real MLflow refusing its tracking URI: one warning line, a tracker record, TensorBoard unaffected."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    specs.copy_data(tmp_path / "data", pretrain_lines=20, labelled_lines=20)
    spec = specs.Stages(tmp_path, manifest(tmp_path), tmp_path / "hf").spec("tokenizer")
    spec = spec.model_copy(update={"stage_dir": str(tmp_path / "stage"), "reporting": Reporting(
        to=["tensorboard", "mlflow"], mlflow=MlflowSettings(tracking_uri="nowhere://at-all"))})
    Path(spec.stage_dir).mkdir()
    t = trackers.Trackers(spec)
    records.configure(spec.stage_dir, t)
    t.record({"event": "start", "step": 0, "time": 1.0})
    t.record({"event": "eval", "step": 0, "time": 1.0, "accuracy": 0.25})
    records.close(0)
    logged = [json.loads(line) for line in Path(spec.stage_dir, records.METRICS).read_text().splitlines()]
    assert [(r["event"], r["name"]) for r in logged] == [("tracker", "mlflow")]
    assert "nowhere" in logged[0]["error"]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "mlflow reporting failed" in line]
    assert len(warnings) == 1, warnings
    events = EventAccumulator(str(tmp_path / "stage"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("eval/accuracy")] == [(0, 0.25)]
    # TensorBoard names a run by the folder holding its event files: under --logdir <run>/stages, the stage's name
    assert {p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("events.out.tfevents.*")} == {"stage"}


# ----------------------------------------------------------------- slow: a real stage, stopped and resumed


class Tracked(specs.Stages):
    """The test's stages, with W&B offline and writing under the test's folder, and MLflow's file store allowed."""

    def env(self) -> dict[str, str]:
        root = self.run_dir.parent
        return super().env() | {"WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_SILENT": "true",
                                "MLFLOW_ALLOW_FILE_STORE": "true"}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> dict[str, Any]:
    """tokenizer, then mlm stopped by SIGTERM after its first step (exit 75) and run again to its end."""
    root = tmp_path_factory.mktemp("trackers")
    specs.copy_data(root / "data", pretrain_lines=200, labelled_lines=20)
    (root / "wandb").mkdir()
    stages = Tracked(root, manifest(root), root / "hf")
    stages.run("tokenizer")
    spec = stages.spec("mlm")
    folder = Path(spec.stage_dir)
    codes = stages.interrupt(spec, specs.stepped(folder), signal.SIGTERM)
    assert codes == [75, 75], codes
    first = {"mlflow": json.loads((folder / trackers.MLFLOW_RUN).read_text()),
             "wandb": sorted(p.name for p in (root / "wandb" / "wandb").glob("offline-run-*"))}
    first["status"] = mlflow_client(root).get_run(first["mlflow"]["run_id"]).info.status
    result = stages.run("mlm", spec)
    return {"root": root, "spec": spec, "folder": folder, "first": first, "result": result}


def mlflow_client(root: Path):
    import os

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the test's file store (MLflow 3 refuses one otherwise)
    return MlflowClient(tracking_uri=f"file://{root}/mlruns")


def _train_and_eval(folder: Path) -> tuple[dict[int, float], dict[int, float]]:
    """metrics.jsonl's train loss and eval_loss by step; a later record of a step wins (as the trackers show)."""
    train = {r["step"]: r["loss"] for r in specs.records(folder, "train")}
    evals = {r["step"]: r["eval_loss"] for r in specs.records(folder, "eval")}
    return train, evals


@pytest.mark.slow
def test_stage_resumed_after_sigterm(tracked):
    starts = specs.records(tracked["folder"], "start")
    assert [s["step"] > 0 for s in starts] == [False, True], starts
    assert not specs.records(tracked["folder"], "tracker")  # no tracker failed


@pytest.mark.slow
def test_tensorboard_event_files(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, evals = _train_and_eval(tracked["folder"])
    events = EventAccumulator(str(tracked["folder"]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/steps_per_s", "train/tokens_per_s", "eval/eval_loss",
            "eval/perplexity", "first_step/startup_s"} <= tags, tags
    loss = {s.step: s.value for s in events.Scalars("train/loss")}
    assert sorted(loss) == sorted(train) and len(events.Scalars("train/loss")) == len(train)  # no step twice
    assert all(math.isclose(loss[k], train[k], rel_tol=1e-6) for k in train), (loss, train)
    assert {s.step: s.value for s in events.Scalars("eval/eval_loss")} == pytest.approx(evals, rel=1e-6)
    assert tracked["result"]["steps"] in loss


@pytest.mark.slow
def test_mlflow_run_continued_on_resume(tracked):
    kept = json.loads((tracked["folder"] / trackers.MLFLOW_RUN).read_text())
    assert kept == tracked["first"]["mlflow"]  # the resumed attempt went on in the same run
    assert tracked["first"]["status"] == "KILLED"  # the attempt stopped on a signal
    client = mlflow_client(tracked["root"])
    runs = client.search_runs([kept["experiment_id"]])
    assert sorted(r.info.run_name for r in runs) == ["mlm", "tokenizer"]
    run = client.get_run(kept["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["baton.fingerprint"] == tracked["spec"].fingerprint
    assert (run.data.tags["baton.run"], run.data.tags["baton.stage"], run.data.tags["baton.kind"]) == (
        "trackers", "mlm", "mlm")
    train, evals = _train_and_eval(tracked["folder"])
    history = client.get_metric_history(kept["run_id"], "train/loss")
    assert [m.step for m in history] == list(train)  # each step once: the stop came between two logged steps
    assert [m.value for m in history] == pytest.approx(list(train.values()), rel=1e-12)
    assert {m.step: m.value for m in client.get_metric_history(kept["run_id"], "eval/eval_loss")} == \
        pytest.approx(evals, rel=1e-12)


@pytest.mark.slow
def test_wandb_offline_run_continued_on_resume(tracked):
    run_id = trackers.wandb_id(tracked["spec"])
    offline = sorted((tracked["root"] / "wandb" / "wandb").glob("offline-run-*"))
    first = [p for p in tracked["first"]["wandb"] if p.endswith(run_id)]
    assert len(first) == 1, tracked["first"]["wandb"]  # the stopped attempt's
    mine = [p for p in offline if p.name.endswith(f"-{run_id}")]
    assert len(mine) == 2, offline  # both attempts: one W&B run id
    for attempt in mine:
        data = (attempt / f"run-{run_id}.wandb").read_bytes()
        assert b"train/loss" in data and b"baton-test" in data
    assert b"eval/eval_loss" in (mine[-1] / f"run-{run_id}.wandb").read_bytes()


def test_tensorboard_drops_what_a_stopped_attempt_logged_past_its_checkpoint(tmp_path):
    """Attempt 1 logs steps 2 … 8 and dies; attempt 2 resumes from step 4's checkpoint: steps 6 and 8 once, anew."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    specs.copy_data(tmp_path / "data", pretrain_lines=20, labelled_lines=20)
    spec = specs.Stages(tmp_path, manifest(tmp_path), tmp_path / "hf").spec("tokenizer")
    spec = spec.model_copy(update={"stage_dir": str(tmp_path / "stage"), "reporting": Reporting(to=["tensorboard"])})
    for resumed, steps, loss in ((0, (2, 4, 6, 8), 1.0), (4, (6, 8), 2.0)):
        t = trackers.Trackers(spec)
        records.configure(spec.stage_dir, t)
        t.record({"event": "start", "step": resumed})
        for step in steps:
            t.record({"event": "train", "step": step, "loss": loss + step})
        records.close(0)
    assert not Path(spec.stage_dir, records.METRICS).exists()  # no tracker failed
    events = EventAccumulator(str(tmp_path / "stage"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [(2, 3.0), (4, 5.0), (6, 8.0), (8, 10.0)]
