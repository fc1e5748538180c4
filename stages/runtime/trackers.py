"""Where rank 0's metrics.jsonl records go besides the file: TensorBoard event files, Weights & Biases, MLflow
(`spec.reporting`, the manifest's run.report_to). One job: turn records into tracker calls.

`Trackers(spec)` is a handler of the records sink (`records.configure(stage_dir, Trackers(spec))`, entry.run):
`record(record)` for every record `records.log` writes (rank 0 only), `close(code)` once when the stage ends, on
every path. The trackers open at the first record, so a stage refused at start-up creates no run anywhere. A
tracker that fails (a library missing, a W&B server out of reach, a wrong MLflow URI) is dropped: one warning line,
a `{"event": "tracker", "name", "error"}` record, and training goes on without it.

Resume: the W&B run id is derived from the run, the stage, its fingerprint and folder (resume="allow"), the MLflow
run id is kept in `<stage_dir>/mlflow_run.json`, and TensorBoard drops the events past the step resumed from.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from contract.files import write_json
from stages.runtime import dist, records
from stages.runtime.spec import Spec

MLFLOW_RUN = "mlflow_run.json"


# ----------------------------------------------------------------- records -> scalars


@dataclass(frozen=True)
class Curves:
    """How one event's records become scalars: each number among its fields (or those of the dict `within`; nested
    dicts flattened with "/") as `<prefix>/<name>`, at the step in field `step`."""

    prefix: str
    within: str | None = None
    step: str = "step"


# Events not named here carry no curve: start, init, checkpoint, stop, draw (indices), greedy (its numbers are in
# the ensemble's eval record too), tracker.
CURVES = {
    "train": Curves("train"),  # loss, lr, samples, tokens, steps_per_s, tokens_per_s, mfu
    "eval": Curves("eval"),  # eval/<metric>; multitask's eval/<task>/<metric>, shared sets' eval/<set>/<metric>
    "loss_terms": Curves("loss_terms", within="terms"),  # distill's task and kd, deep supervision's layers
    "mixing": Curves("mixing", within="drawn"),  # multitask: micro-batches drawn per task in the window
    "phase": Curves("curriculum", step="first_step"),  # curriculum phase, pool, examples, data_fraction, max_length
    "prune": Curves("prune"),  # prune/before/<x>, prune/after/<x>
    "train_losses": Curves("train_losses"),  # eval.score_train: mean, min, max over the training examples
    "first_step": Curves("first_step"),  # startup_s
}
NOT_SCALARS = {"event", "time", "step", "first_step", "until_step"}


def scalars(record: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """A metrics.jsonl record as (its step, or None where it has none; {tag: value}). Null values (a NaN, as the
    record holds it) and non-numbers are left out."""
    curves = CURVES.get(record.get("event", ""))
    if curves is None:
        return None, {}
    fields = record.get(curves.within, {}) if curves.within else record
    out: dict[str, float] = {}
    _numbers(curves.prefix, {k: v for k, v in fields.items() if curves.within or k not in NOT_SCALARS}, out)
    step = record.get(curves.step)
    return (step if isinstance(step, int) and not isinstance(step, bool) else None), out


def _numbers(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _numbers(f"{prefix}/{k}", v, out)
    elif isinstance(value, (int, float)):  # bool too: greedy/<member>/kept
        out[prefix] = float(value)


# ----------------------------------------------------------------- the trackers


class Tracker(Protocol):
    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self, code: int) -> None: ...


class TensorBoard:
    """Event files in the stage's folder itself: TensorBoard names a run by the folder that holds its event
    files, so `tensorboard --logdir <run>/stages` shows each stage as a run named after it (not `<stage>/...`)."""

    name = "tensorboard"

    def __init__(self, spec: Spec, resumed: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops what the stopped attempt logged past the checkpoint resumed from
        self.writer = SummaryWriter(log_dir=spec.stage_dir,
                                    purge_step=resumed + 1 if resumed else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, code: int) -> None:
        self.writer.close()


def wandb_id(spec: Spec) -> str:
    """The stage's W&B run id: the same for every attempt of the same stage in the same run folder (a resume
    continues the run), another for a changed stage (another fingerprint) or the same manifest run elsewhere."""
    key = "\0".join((spec.run_name, spec.stage, spec.fingerprint, str(Path(spec.stage_dir).resolve())))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def identity(spec: Spec) -> dict[str, str]:
    return {"run": spec.run_name, "stage": spec.stage, "kind": spec.kind, "fingerprint": spec.fingerprint}


class Wandb:
    """A W&B run per stage: project = wandb.project, WANDB_PROJECT or the run's name; group = the run's name;
    name = the stage's. Offline mode and the rest come from W&B's own WANDB_* variables."""

    name = "wandb"

    def __init__(self, spec: Spec, resumed: int) -> None:
        import wandb

        s = spec.reporting.wandb
        self.run = wandb.init(
            project=s.project or os.environ.get("WANDB_PROJECT") or spec.run_name, entity=s.entity,
            group=spec.run_name, name=spec.stage, job_type=spec.kind, id=wandb_id(spec), resume="allow",
            config={"baton": identity(spec)}, tags=[t[:64] for t in (spec.run_name, spec.stage, spec.kind)],
            # the stage writes inside its own folder, unless WANDB_DIR says where
            dir=None if os.environ.get("WANDB_DIR") else spec.stage_dir)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)  # a step below the run's last (a resumed window logged twice) is dropped

    def flush(self) -> None:
        pass

    def close(self, code: int) -> None:
        if code == 75:  # stopped on a signal, to be resumed
            self.run.mark_preempting()
        self.run.finish(exit_code=code)


class Mlflow:
    """An MLflow run per stage, in experiment mlflow.experiment, MLFLOW_EXPERIMENT_NAME or the run's name; its id
    kept in `<stage_dir>/mlflow_run.json`, so a resumed stage goes on logging to it."""

    name = "mlflow"
    STATUS = {0: "FINISHED", 75: "KILLED"}  # anything else: FAILED

    def __init__(self, spec: Spec, resumed: int) -> None:
        from mlflow.tracking import MlflowClient

        s = spec.reporting.mlflow
        self.client = MlflowClient(tracking_uri=s.tracking_uri)
        kept = Path(spec.stage_dir) / MLFLOW_RUN
        run_id = json.loads(kept.read_text())["run_id"] if kept.is_file() else None
        if run_id is not None and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = s.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or spec.run_name
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            tags = {f"baton.{k}": v for k, v in identity(spec).items()}
            run_id = self.client.create_run(experiment_id, run_name=spec.stage, tags=tags).info.run_id
            write_json(kept, {"run_id": run_id, "experiment_id": experiment_id})
        self.run_id = run_id

    def _exists(self, run_id: str) -> bool:
        """Whether the kept run is in this tracking store (the URI may have changed since)."""
        try:
            self.client.get_run(run_id)
        except Exception:  # MlflowException: not found here
            return False
        return True

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow refuses other characters in metric names (e.g. an '@' of a retry attempt's stage)
        self.client.log_batch(self.run_id, metrics=[Metric(re.sub(r"[^\w\-. /]", "_", tag), value, now, step)
                                                    for tag, value in values.items()])

    def flush(self) -> None:
        pass

    def close(self, code: int) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS.get(code, "FAILED"))


TRACKERS: dict[str, Callable[[Spec, int], Tracker]] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}


# ----------------------------------------------------------------- the stage's trackers


class Trackers:
    """The trackers of one stage process: a handler of the records sink (`records.Handler`)."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.open: list[Tracker] | None = None  # None until the first record
        self.step = 0  # the latest step seen: where a record without one is shown

    def record(self, record: dict[str, Any]) -> None:
        if self.open is None:
            self.open = []  # before opening: a failure's own record comes back here
            resumed = record.get("step", 0) if record.get("event") == "start" else 0
            for name in self.spec.reporting.to:
                tracker = self._guarded(name, functools.partial(TRACKERS[name], self.spec, resumed))
                if tracker is not None:
                    self.open.append(tracker)
        step, values = scalars(record)
        self.step = step if step is not None else self.step
        for tracker in list(self.open):
            if values:
                self._guarded(tracker.name, functools.partial(tracker.log, self.step, values), tracker)
            if record.get("event") == "checkpoint":  # what a checkpoint covers is on disk with it
                self._guarded(tracker.name, tracker.flush, tracker)

    def close(self, code: int) -> None:
        for tracker in self.open or []:
            self._guarded(tracker.name, functools.partial(tracker.close, code))
        self.open = []

    def _guarded(self, name: str, call: Callable[[], Any], tracker: Tracker | None = None) -> Any:
        """`call()`; if it fails, the tracker is dropped for the rest of the stage (training goes on)."""
        try:
            return call()
        except Exception as e:
            if tracker is not None and self.open is not None and tracker in self.open:
                self.open.remove(tracker)
            error = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            dist.print0(f"warning: {name} reporting failed, going on without it: {error}")
            records.log("tracker", name=name, error=error)
            return None

