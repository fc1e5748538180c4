"""Where a stage stands, read from its `metrics.jsonl` as the stage writes it: step, loss, speed, ETA, last eval.

`baton status` reads a stage's records once; the live view of `baton run` reads the new lines every moment
(`Progress.update` keeps its place in the file). Nothing here imports torch or writes anything.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


class Tail:
    """The complete lines appended to a file since the last call (a line still being written waits)."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset, self._partial = path, 0, b""

    def lines(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return lines


@dataclass
class Progress:
    """The running summary of one stage's metrics records (of every attempt: a resume goes on from its step)."""

    folder: Path
    launched: str | None = None  # ISO time the newest attempt was launched: the start-up time is measured from it
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    steps_per_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    tokens: int = 0  # trained on in this attempt, counted from the train records
    startup_s: float | None = None
    eval: dict[str, Any] = field(default_factory=dict)  # the newest eval record's metrics
    eval_step: int | None = None
    updated: float | None = None  # unix time of the newest record
    _tail: Tail | None = None

    def update(self) -> bool:
        """Read the records added since the last call; True when there were any."""
        self._tail = self._tail or Tail(self.folder / METRICS)
        lines = self._tail.lines()
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(record, dict):
                self.add(record)
        return bool(lines)

    def add(self, rec: dict[str, Any]) -> None:
        event = rec.get("event")
        self.updated = _number(rec.get("time")) or self.updated
        if event == "start":
            self.step, self.max_steps = rec.get("step"), rec.get("max_steps") or self.max_steps
            self.steps_per_s = self.tokens_per_s = None
            self.tokens = 0
        elif event == "first_step" and self.launched_at is not None and (_number(rec.get("time")) or 0) >= \
                self.launched_at:  # an earlier attempt's (its records kept with its output) is not this one's
            self.startup_s = rec["time"] - self.launched_at
        elif event == "train":
            self.step, self.loss, self.lr = rec.get("step"), _number(rec.get("loss")), _number(rec.get("lr"))
            self.steps_per_s, self.tokens_per_s = _number(rec.get("steps_per_s")), _number(rec.get("tokens_per_s"))
            self.mfu = _number(rec.get("mfu"))
            self.tokens += int(rec.get("tokens") or 0)
        elif event == "eval":
            self.eval = {k: v for k, v in rec.items() if k not in ("event", "time", "step")}
            self.eval_step = rec.get("step")

    @property
    def launched_at(self) -> float | None:
        """`launched` as unix time."""
        return dt.datetime.fromisoformat(self.launched).timestamp() if self.launched else None

    @property
    def eta_s(self) -> float | None:
        """Seconds to the last step at the newest measured rate."""
        if self.step is None or not self.max_steps or not self.steps_per_s:
            return None
        return max(self.max_steps - self.step, 0) / self.steps_per_s

    def as_dict(self) -> dict[str, Any]:
        """For `baton status --json`: the fields that are known."""
        out = {k: getattr(self, k) for k in ("step", "max_steps", "loss", "lr", "steps_per_s", "tokens_per_s", "mfu",
                                             "startup_s", "eval_step")}
        out |= {"eta_s": None if self.eta_s is None else round(self.eta_s, 1), "eval": self.eval or None,
                "updated": None if self.updated is None else _iso(self.updated),
                "tokens": self.tokens or None}
        return {k: v for k, v in out.items() if v is not None}


def read(folder: Path, launched: str | None = None) -> Progress:
    progress = Progress(folder, launched)
    progress.update()
    return progress


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")
