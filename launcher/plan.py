"""What to run: skip done stages whose fingerprint matches, resume a half-done one,
rerun a changed one and everything downstream of it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from contract.files import short
from contract.layout import final_dir, newest_complete, resumable, stage_dir
from contract.spec import Spec
from launcher import decisions
from launcher.digests import folder_digest, folder_stat
from launcher.errors import ConfigError
from launcher.resolve import Resolved, build_spec, fingerprint_any_world, settings

Action = Literal["skip", "run", "resume", "rerun", "wait"]  # wait: a retry attempt, until its gate decides


@dataclass
class Step:
    stage: Resolved
    action: Action
    reason: str
    resume_tag: str | None = None
    spec: Spec | None = None  # None until every upstream stage has its output
    selected: bool = True  # False: left out by --only / --from


def make_plan(stages: list[Resolved], ledger: dict[str, Any], run_dir: Path,
              only: str | None = None, start: str | None = None) -> list[Step]:
    """One step per instance (`launcher.instances`). Before skipping a done stage or handing its final/ to a later
    stage, the plan makes sure the folder still holds what the ledger recorded (`output_damage`); a damaged one
    reruns with its descendants. Decisions (`launcher.decisions`) say which retry attempts run and what each stage
    hands on; those of a stage that this plan changes wait until it has run."""
    names = list(decisions.groups(stages))
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage; stages: {', '.join(names)}")
    selected = {only} if only else set(names[names.index(start):]) if start else set(names)
    entries = ledger.get("stages", {})
    records = decisions.decide_all(ledger, stages)
    outputs = decisions.outputs_of(ledger, stages, records)
    changing: set[str] = set()  # stages (manifest names) whose hand-on this plan may replace
    damage: dict[str, str | None] = {}  # instances whose output was checked: why it is damaged, or None

    def damaged(name: str) -> str | None:
        if name not in damage:
            damage[name] = output_damage(run_dir, name, entries.get(name, {}))
        return damage.get(name)

    steps: list[Step] = []
    for r in stages:
        entry = entries.get(r.name, {})
        if r.group not in selected:
            done = entry.get("state") == "done"
            reason = "not selected" + ("" if done else f" (state {entry.get('state', 'never run')})")
            steps.append(Step(r, "skip", reason, selected=False))
            continue
        stopped = decisions.stopped_at(records, [g for g in names[:names.index(r.group)] if g not in changing])
        if stopped:
            steps.append(Step(r, "skip", f"not run: {records[stopped]['reason']}"))
            continue
        if r.role == "retry":
            earlier = [s for s in steps if s.stage.group == r.group]
            want = decisions.wanted(r, records, names)
            if any(s.action != "skip" for s in earlier) or want == "undecided":
                steps.append(Step(r, "wait", f"runs if the gate of {r.group} fails on {earlier[-1].stage.name}"))
                changing.add(r.group)
                continue
            if want == "away":
                steps.append(Step(r, "skip", decisions.not_needed(records[r.group])))
                continue
        stale = [u for u in r.upstream if u in changing]
        missing = [u for u in r.upstream if u not in outputs and u not in changing]
        damaged_up = [u for u in missing if entries.get(u, {}).get("state") == "damaged"]
        if damaged_up:
            raise ConfigError([f"stage {r.name} needs the output of {u}, which is damaged ({entries[u].get('damage')})"
                               f"; rerun {u} first (baton run --from {u}, or drop --only/--from)" for u in damaged_up])
        if missing:
            raise ConfigError(
                f"stage {r.name} needs the output of {', '.join(missing)}, which has not run; "
                f"run {'them' if len(missing) > 1 else 'it'} first (drop --only/--from)"
            )
        broken = [(u, hurt) for u in r.upstream if u not in changing and (hurt := damaged(outputs[u]["instance"]))]
        if broken:
            raise ConfigError([f"stage {r.name} needs the output of {u}, which is damaged ({hurt}); "
                               f"rerun {u} first (baton run --from {u}, or drop --only/--from)" for u, hurt in broken])
        spec = None if stale else build_spec(r, run_dir, outputs)
        step = _decide(r, entry, spec, stale, stage_dir(run_dir, r.name))
        if step.action == "skip" and (why := damaged(r.name)):
            step = Step(r, "rerun", f"output damaged: {why}", spec=spec)
        if step.action != "skip" or (r.rule is not None and records[r.group]["outcome"] == "pending"):
            changing.add(r.group)
        steps.append(step)
    return steps


def _decide(r: Resolved, entry: dict[str, Any], spec: Spec | None, stale: list[str], folder: Path) -> Step:
    state = entry.get("state")
    if spec is None:
        return Step(r, "rerun" if state else "run", f"input from {', '.join(stale)} will change")
    fp = spec.fingerprint
    if not entry or state in ("pending", "skipped"):
        return Step(r, "run", "new", spec=spec)
    recorded = entry.get("settings") or {}
    same = entry.get("fingerprint") == fp
    if not same and (spec.any_world is None or fingerprint_any_world(recorded) != spec.any_world):
        return Step(r, "rerun", "changed: " + diff(recorded, settings(spec)), spec=spec)
    if state == "damaged":  # found by `baton verify`, or by a stage that read it: start over
        return Step(r, "rerun", f"output damaged: {entry.get('damage') or 'its final/ changed'}", spec=spec)
    if state == "done" and (folder / "result.json").is_file():
        kept = (f"done at world size {recorded.get('world_size')}; kept at {spec.world_size} "
                "(checkpoint.on_world_size_change: resume)")
        return Step(r, "skip", "done, unchanged" if same else kept, spec=spec)
    tag = resumable(folder, fp, spec.any_world)
    if tag:
        return Step(r, "resume", f"{state}; resume from {tag}{_reshard_note(folder, spec)}", resume_tag=tag, spec=spec)
    return Step(r, "rerun", f"{state}; no complete checkpoint, starting over", spec=spec)


def world_size_change(folder: Path, world_size: int) -> dict[str, int] | None:
    """{"from", "to", "step"} when the newest complete checkpoint was saved at another world size."""
    found = newest_complete(folder)
    saved = found[1].get("world_size") if found else None
    if found is None or not isinstance(saved, int) or saved == world_size:
        return None
    return {"from": saved, "to": world_size, "step": found[1].get("step", 0)}


def _reshard_note(folder: Path, spec: Spec) -> str:
    change = world_size_change(folder, spec.world_size)
    return f", saved at world size {change['from']}" if change else ""


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


# ----------------------------------------------------------------- is a done stage's output still there?


def stat_changes(recorded: dict[str, list[int]], now: dict[str, list[int]], prefix: str = "final/") -> list[str]:
    """What differs between two `folder_stat`s: `final/x changed`, `final/x is missing`, `final/x is new`."""
    changed = [f"{prefix}{p} changed" for p in recorded if p in now and list(now[p]) != list(recorded[p])]
    return (changed + [f"{prefix}{p} is missing" for p in recorded if p not in now]
            + [f"{prefix}{p} is new" for p in now if p not in recorded])


def disk_state(run_dir: Path, name: str, entry: dict[str, Any]) -> Literal["ok", "changed", "missing", "unknown"]:
    """Without hashing: does a done stage's final/ still look as recorded? unknown: the ledger has no stat record
    (made before baton recorded one); `baton verify` hashes."""
    final = final_dir(stage_dir(run_dir, name))
    recorded = (entry.get("output") or {}).get("stat")
    if not final.is_dir():
        return "missing"
    if recorded is None:
        return "unknown"
    return "ok" if folder_stat(final) == recorded else "changed"


def output_damage(run_dir: Path, name: str, entry: dict[str, Any]) -> str | None:
    """Why a stage's recorded output (final/) no longer holds what the ledger says, or None when it does.

    Fast path: the files' sizes and mtimes match the stat record, so the digest is trusted. Otherwise (or for a
    ledger without a stat record) the folder is hashed again and compared with the recorded digest."""
    out = entry.get("output") or {}
    if entry.get("state") != "done" or not out.get("digest"):
        return None  # nothing recorded to check against
    final = final_dir(stage_dir(run_dir, name))
    if not final.is_dir():
        return "final/ is missing"
    now = folder_stat(final)
    recorded = out.get("stat")
    if recorded == now or folder_digest(final, now) == out["digest"]:
        return None
    changes = stat_changes(recorded, now) if recorded is not None else []
    if not changes:
        return f"final/ holds {short(folder_digest(final, now))}, not the recorded {short(out['digest'])}"
    return ", ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "") + \
        " since it was recorded"
