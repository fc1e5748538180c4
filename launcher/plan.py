"""What to run: skip done stages whose fingerprint matches, resume a half-done one,
rerun a changed one and everything downstream of it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from contract.layout import resumable, stage_dir
from contract.spec import Spec
from launcher.errors import ConfigError
from launcher.resolve import Resolved, build_spec, settings

Action = Literal["skip", "run", "resume", "rerun"]


@dataclass
class Step:
    stage: Resolved
    action: Action
    reason: str
    resume_tag: str | None = None
    spec: Spec | None = None  # None until every upstream stage has its output


def outputs_of(ledger: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {name: e["output"] for name, e in ledger.get("stages", {}).items()
            if e.get("state") == "done" and e.get("output")}


def make_plan(stages: list[Resolved], ledger: dict[str, Any], run_dir: Path,
              only: str | None = None, start: str | None = None) -> list[Step]:
    names = [s.name for s in stages]
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage; stages: {', '.join(names)}")
    selected = {only} if only else set(names[names.index(start):]) if start else set(names)
    entries = ledger.get("stages", {})
    outputs = outputs_of(ledger)
    changing: set[str] = set()  # stages whose output this plan will replace
    steps: list[Step] = []
    for r in stages:
        entry = entries.get(r.name, {})
        if r.name not in selected:
            done = entry.get("state") == "done"
            steps.append(Step(r, "skip",
                              "not selected" + ("" if done else f" (state {entry.get('state', 'never run')})")))
            continue
        stale = [u for u in r.upstream if u in changing]
        missing = [u for u in r.upstream if u not in outputs and u not in changing]
        if missing:
            raise ConfigError(
                f"stage {r.name} needs the output of {', '.join(missing)}, which has not run; "
                f"run {'them' if len(missing) > 1 else 'it'} first (drop --only/--from)"
            )
        spec = None if stale else build_spec(r, run_dir, outputs)
        step = _decide(r, entry, spec, stale, stage_dir(run_dir, r.name))
        if step.action != "skip":
            changing.add(r.name)
        steps.append(step)
    return steps


def _decide(r: Resolved, entry: dict[str, Any], spec: Spec | None, stale: list[str], folder: Path) -> Step:
    state = entry.get("state")
    if spec is None:
        return Step(r, "rerun" if state else "run", f"input from {', '.join(stale)} will change")
    fp = spec.fingerprint
    if not entry or state == "pending":
        return Step(r, "run", "new", spec=spec)
    if entry.get("fingerprint") != fp:
        return Step(r, "rerun", "changed: " + diff(entry.get("settings") or {}, settings(spec)), spec=spec)
    if state == "done" and (folder / "result.json").is_file():
        return Step(r, "skip", "done, unchanged", spec=spec)
    tag = resumable(folder, fp)
    if tag:
        return Step(r, "resume", f"{state}; resume from {tag}", resume_tag=tag, spec=spec)
    return Step(r, "rerun", f"{state}; no complete checkpoint, starting over", spec=spec)


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The settings that differ, as `train.lr 0.001 -> 0.0005`, at most a few."""
    changes: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changes.append(diff(a, b, f"{prefix}{key}."))
        else:
            changes.append(f"{prefix}{key} {_short(a)} -> {_short(b)}")
    return "; ".join(changes[:4]) + (" …" if len(changes) > 4 else "") if changes else "settings"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "…"
