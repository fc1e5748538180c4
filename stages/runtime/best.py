"""eval.best and eval.patience: which eval so far was the best, and how many since have not beaten it.

The selection is part of the position in the run: every checkpoint saves `state()` and a resume `restore`s it,
so a resumed stage picks the same step and stops early at the same step as one never stopped. The best step's
model waits in the stage folder's best/ (exported as final/ is, when a new best is seen) until `finish` makes it
final/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from contract.files import json_safe
from contract.sections import Best
from stages.runtime.spec import SpecError

BEST = "best"  # <stage>/best/: the best step's model, as final/ will hold it
STEP_FILE = "best.json"  # inside best/: the step it holds (taken out before it becomes final/)


@dataclass
class Selection:
    best: Best
    patience: int | None
    step: int | None = None  # the best eval's step; None before the first eval
    metrics: dict[str, Any] = field(default_factory=dict)  # its values (and the shared eval sets' scores)
    since: int = 0  # evals since then that did not beat it
    last_step: int | None = None  # the newest eval's step and values: a stage that ends there reports them beside
    last_metrics: dict[str, Any] = field(default_factory=dict)

    def see(self, step: int, values: dict[str, float]) -> bool:
        """Count the eval at `step`; True when it is the best so far (its model is then to be kept)."""
        if self.best.metric not in values:
            raise SpecError(f"eval.best.metric: the stage's eval gives no {self.best.metric!r}; it gives "
                            f"{', '.join(values)}")
        self.last_step, self.last_metrics = step, dict(values)
        if self.step is not None and not self._beats(values[self.best.metric], self.metrics[self.best.metric]):
            self.since += 1
            return False
        self.step, self.metrics, self.since = step, dict(values), 0
        return True

    def _beats(self, value: float | None, best: float | None) -> bool:
        """Strictly better: a tie keeps the earlier step. A NaN (null) never wins, and any number beats one."""
        if value is None or math.isnan(value):
            return False
        if best is None or math.isnan(best):
            return True
        return value > best if self.best.mode == "max" else value < best

    @property
    def exhausted(self) -> bool:
        """Early stopping is due: `patience` evals in a row have not beaten the best."""
        return self.patience is not None and self.since >= self.patience

    def reason(self) -> str:
        return (f"early stopping: {self.best.metric} has not improved on step {self.step}'s "
                f"{self.metrics[self.best.metric]:.6g} for {self.since} evals (eval.patience {self.patience})")

    def state(self) -> dict[str, Any]:
        """What a checkpoint saves (JSON)."""
        return json_safe({"step": self.step, "metrics": self.metrics, "since": self.since, "last_step": self.last_step,
                "last_metrics": self.last_metrics})

    def restore(self, state: dict[str, Any] | None) -> None:
        if state:
            self.step, self.metrics, self.since = state["step"], state["metrics"], state["since"]
            self.last_step, self.last_metrics = state["last_step"], state["last_metrics"]
