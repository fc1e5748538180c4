"""What a run came to, in a few lines: its outcome, and each stage's key metric with what it bought against the
stage it was made from. `baton run` ends with it as text (the live view has scrolled the numbers away by then);
`baton report` opens with it. Reads the ledger's data only (no torch, no metrics files)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A stage's key metric: the first of these it has, on a shared eval set (comparable across stages) before its own
KEY = ("accuracy", "exact_match", "macro_f1", "perplexity", "eval_loss")


@dataclass(frozen=True, slots=True)
class Row:
    stage: str
    kind: str
    state: str
    metric: str | None  # the key metric's name, `<set>/<metric>` for a shared eval set's
    value: float | None
    came_from: str | None  # the stage whose output it started from (its `init`)
    change: float | None  # value minus came_from's value of the same metric

    @property
    def better(self) -> bool | None:
        """Whether the change is an improvement (a loss or perplexity that fell), None without a change."""
        if not self.change or self.metric is None:
            return None
        lower = self.metric.endswith(("loss", "perplexity"))
        return (self.change < 0) == lower


def key_metric(metrics: dict[str, Any], shared: list[str]) -> tuple[str, float] | None:
    """(name, value) of a stage's key metric: KEY's first on the first shared eval set, else KEY's first of its
    own, else its first number."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name in [f"{s}/{m}" for s in shared for m in KEY] + list(KEY):
        if name in numbers:
            return name, float(numbers[name])
    own = next((k for k in numbers if k.split("/")[0] not in shared), None)
    return (own, float(numbers[own])) if own else None


def rows(data: dict[str, Any]) -> list[Row]:
    """One row per stage of the ledger, in run order."""
    shared = list(data.get("evals") or [])
    keys = {n: key_metric(e.get("metrics") or {}, shared) for n, e in data["stages"].items()}
    out = []
    for name, e in data["stages"].items():
        init = (e.get("inputs") or {}).get("init")
        came_from = init.get("stage") if isinstance(init, dict) and init.get("source") == "stage" else None
        key = keys[name]
        before = (data["stages"].get(came_from) or {}).get("metrics") or {} if came_from else {}
        change = key[1] - before[key[0]] if key and isinstance(before.get(key[0]), (int, float)) else None
        out.append(Row(name, str(e.get("kind", "?")), str(e.get("state", "?")), key[0] if key else None,
                       key[1] if key else None, came_from, change))
    return out


def outcome(data: dict[str, Any]) -> str:
    """The run's outcome in one line: done, stopped by a gate, failed, or not finished (and what to do)."""
    states = {n: str(e.get("state", "?")) for n, e in data["stages"].items()}
    stop = next((n for n, rec in (data.get("decisions") or {}).items() if rec.get("outcome") == "stop"), None)
    if stop:
        return f"stopped by the gate on {stop}: {(data['decisions'][stop].get('reason') or '').strip()}".rstrip(": ")
    for words, among in (("failed", ("failed", "damaged")),
                         ("not finished", ("preempted", "running", "requeued", "queued", "pending", "cancelled"))):
        found = [f"{n} ({s})" for n, s in states.items() if s in among]
        if found:
            return f"{words}: {', '.join(found)}; `baton run` again resumes" if words == "not finished" else \
                f"{words}: {', '.join(found)}"
    done = sum(s == "done" for s in states.values())
    return f"done: {done} stage(s)" + (f", {len(states) - done} skipped by decisions" if done < len(states) else "")


def change_text(row: Row) -> str:
    """"+0.05 vs ft (better)", or "-" where the stage it came from has no such metric."""
    if row.change is None:
        return "-"
    verdict = {True: " (better)", False: " (worse)", None: ""}[row.better]
    return f"{row.change:+.4g} vs {row.came_from}{verdict}"


def table(data: dict[str, Any], ran: set[str] | None = None) -> str:
    """The summary as text: the outcome, then stage, state, key metric and change, columns two spaces apart.
    `ran`: the stages this invocation launched (a column says which), None to leave the column out."""
    head = ["stage", "state", *(["this run"] if ran is not None else []), "key metric", "change"]
    lines = [head]
    for r in rows(data):
        metric = f"{r.metric} {r.value:.4g}" if r.metric is not None and r.value is not None else "-"
        this = (["ran" if r.stage in ran else "-"] if ran is not None else [])
        lines.append([r.stage, r.state, *this, metric, change_text(r)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    body = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    return f"outcome: {outcome(data)}\n{body}"
