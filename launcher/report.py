"""`baton status`, `baton lineage` and `baton verify`: read-only views of a run folder (no lock, no torch).

status and lineage compare a done stage's files with their recorded sizes and mtimes only (cheap); verify hashes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from contract.files import dir_digest, short
from contract.layout import final_dir, read_metrics, stage_dir
from launcher import ledger
from launcher.decisions import describe
from launcher.digests import folder_stat
from launcher.errors import BatonError
from launcher.plan import disk_state, stat_changes

ON_DISK = {"changed": "CHANGED ON DISK", "missing": "final/ MISSING"}  # marks of a done stage whose final/ differs


def _load(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / ledger.LEDGER).is_file():
        raise BatonError(f"{run_dir}: no {ledger.LEDGER} here; is this a run folder (runs/<name>)?")
    return ledger.read(run_dir)


def last_progress(folder: Path, launched: str | None) -> dict[str, Any]:
    """The newest train step, and the start-up time (launch -> first step) of the attempt launched at `launched`."""
    out: dict[str, Any] = {}
    for rec in read_metrics(folder):
        if rec.get("event") == "train":
            out["step"] = rec.get("step")
        elif rec.get("event") == "first_step" and launched and "time" in rec:
            out["startup_s"] = rec["time"] - dt.datetime.fromisoformat(launched).timestamp()
    return out


def status(run_dir: Path) -> str:
    data = _load(run_dir)
    rows: list[tuple[str, ...]] = [
        ("stage", "kind", "state", "steps", "metrics", "input -> output", "tries", "launch -> step 1")]
    jobs: dict[str, str] = {}
    shared = set(data.get("evals") or [])  # the shared eval sets' metrics have a table of their own
    if any(e.get("slurm") for e in data["stages"].values()):
        from launcher.jobs import slurm_column

        jobs = slurm_column(data["stages"])
        rows[0] += ("slurm",)
    for name, e in data["stages"].items():
        folder = stage_dir(run_dir, name)
        progress = last_progress(folder, (e.get("attempts") or [{}])[-1].get("started"))
        steps = e.get("steps") if e.get("state") == "done" else progress.get("step")
        own = [(k, v) for k, v in (e.get("metrics") or {}).items() if k.split("/")[0] not in shared]  # see below
        shown = ", ".join(f"{k} {_num(v)}" for k, v in own) or "-"  # in the order the stage gave them
        refs = [ref for k, value in (e.get("inputs") or {}).items() if k != "data" for ref in _each(value)]
        inputs = [i for i in dict.fromkeys(short(ref.get("digest")) for ref in refs) if i != "-"] or ["data"]
        io = f"{','.join(inputs)} -> {short((e.get('output') or {}).get('digest'))}"
        startup = f"{progress['startup_s']:.1f} s" if progress.get("startup_s") is not None else "-"
        state = e.get("state", "?")
        if state == "done" and e.get("output"):
            mark = ON_DISK.get(disk_state(run_dir, name, e))
            state += f" ({mark})" if mark else ""
        row = (name, e.get("kind", "?"), state, str(steps if steps is not None else "-"),
               shown, io, str(len(e.get("attempts", []))), startup)
        rows.append(row + ((jobs.get(name, "-"),) if jobs else ()))
    text = f"run {data.get('run', '?')}  ({run_dir})\n" + _table(rows)
    return "\n\n".join([text, *filter(None, [_shared_table(data), _decisions(data)])])


def _shared_table(data: dict[str, Any]) -> str:
    """The shared eval sets' metrics of every done stage side by side: what each stage bought."""
    sets = data.get("evals") or []
    done = {n: e.get("metrics") or {} for n, e in data["stages"].items() if e.get("state") == "done"}
    columns = [k for s in sets for k in dict.fromkeys(k for m in done.values() for k in m if k.startswith(f"{s}/"))]
    if not columns:
        return ""
    rows = [("shared evals", *columns)] + [(n, *(_num(m[c]) if c in m else "-" for c in columns))
                                           for n, m in done.items() if any(c in m for c in columns)]
    return _table(rows)


def _decisions(data: dict[str, Any]) -> str:
    """Each decision taken: the gates' checks with their numbers, retries, fallbacks, the chosen variants."""
    lines = []
    for name, rec in (data.get("decisions") or {}).items():
        lines += [f"{name}: {describe(e)}" for e in rec.get("events", [])]
        outcome = {"pass": f"hands on {rec.get('hand_on')}", "pending": f"waiting for {rec.get('next')}",
                   "fallback": f"hands on {rec.get('hand_on')} (fallback {rec.get('fallback')})",
                   "stop": f"STOPPED THE RUN: {rec.get('reason')}"}.get(rec.get("outcome"), "?")
        lines.append(f"{name}: {outcome}")
    return "decisions\n" + "\n".join(f"  {line}" for line in lines) if lines else ""


def lineage(run_dir: Path) -> str:
    data = _load(run_dir)
    stages = data["stages"]
    lines = [f"run {data.get('run', '?')}  manifest {data.get('manifest', '?')} {short(data.get('manifest_digest'))}"]
    for name, e in stages.items():
        lines.append(f"{name} [{e.get('kind', '?')}] {e.get('state', '?')}")
        for key, value in (e.get("inputs") or {}).items():
            if key == "data":
                lines += [f"  <- data {path}  {short(d)}" for path, d in value.items()]
                continue
            for ref in _each(value):
                lines.append(_input_line(key, ref, stages, run_dir))
        out = e.get("output")
        if out:
            mark = ON_DISK.get(disk_state(run_dir, name, e)) if e.get("state") == "done" else None
            lines.append(f"  -> {out['path']}  {short(out['digest'])}" + (f"  ({mark})" if mark else ""))
        rec = (data.get("decisions") or {}).get(name)
        if rec:
            lines += [f"  decided: {describe(ev)}" for ev in rec.get("events", [])]
    return "\n".join(lines)


def verify(run_dir: Path) -> tuple[str, bool]:
    """Hash every done stage's final/ again and compare with the ledger: (one line per stage, all intact)."""
    data = _load(run_dir)
    lines, intact = [], True
    for name, e in data["stages"].items():
        out = e.get("output") or {}
        if e.get("state") != "done" or not out.get("digest"):
            lines.append(f"{name}: - (state {e.get('state', '?')}; no output to verify)")
            continue
        final = final_dir(stage_dir(run_dir, name))
        if not final.is_dir():
            lines.append(f"{name}: missing: {final} (recorded {short(out['digest'])})")
            intact = False
            continue
        now = dir_digest(final)
        if now == out["digest"]:
            lines.append(f"{name}: ok {short(now)}")
            continue
        intact = False
        changes = stat_changes(out["stat"], folder_stat(final)) if out.get("stat") is not None else []
        lines.append(f"{name}: DAMAGED: recorded {short(out['digest'])} now {short(now)}"
                     + (f" ({', '.join(changes[:3])}{' …' if len(changes) > 3 else ''})" if changes else ""))
    return "\n".join(lines), intact


def _each(value: Any) -> list[dict[str, Any]]:
    """An input's references: one, or a list (ensemble members …)."""
    return value if isinstance(value, list) else [value] if value else []


def _input_line(key: str, ref: dict[str, Any], stages: dict[str, Any], run_dir: Path) -> str:
    if ref["source"] == "stage":
        entry = stages.get(ref["stage"], {})
        upstream = (entry.get("output") or {}).get("digest")
        if upstream != ref["digest"]:
            mark = f"STALE: {ref['stage']} now gives {short(upstream)}"
        else:  # the digests agree; do the files still? (sizes and mtimes only: `baton verify` hashes)
            on_disk = disk_state(run_dir, ref["stage"], entry)
            mark = ON_DISK.get(on_disk) or ("ok" if on_disk == "ok" else "ok as recorded; `baton verify` checks files")
        via = f"; handed on for {ref['named']}" if ref.get("named") else ""
        return f"  <- {key} {ref['stage']}/final  {short(ref['digest'])}  ({mark}{via})"
    if ref["source"] == "pretrained":
        return f"  <- {key} {ref['path']}  {short(ref.get('digest'))}"
    return f"  <- {key} built from a config"


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
