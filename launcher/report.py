"""`baton status` (a table, or `--json`) and `baton verify`: views of a run folder (no torch).

status reads only (no lock): it compares a done stage's files with their recorded sizes and mtimes (cheap). verify
hashes, and records in the ledger (under its lock) each stage whose final/ it finds damaged, which the next run
reruns. The lineage is launcher/lineage.py's, the HTML page launcher/htmlreport.py's."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from contract.files import dir_digest, short
from contract.layout import final_dir, stage_dir
from launcher import ledger
from launcher.decisions import describe, stale_stages
from launcher.digests import folder_stat
from launcher.errors import ConfigError, LedgerError
from launcher.ledger import Ledger
from launcher.lineage import ON_DISK, load, refs
from launcher.plan import disk_state, stat_changes
from launcher.progress import read as read_progress


def run_folder(path: Path) -> Path:
    """The run folder `baton status` shows: `path` itself, or for a manifest (a file) the folder it runs in,
    run.dir or runs/<run.name> (relative to the working directory, as `baton run` makes it). Only the manifest's
    `run:` is read: a run whose data have moved since still shows."""
    if not path.is_file():
        return path
    import yaml

    try:
        run = (yaml.safe_load(path.read_text()) or {}).get("run") or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as e:
        raise ConfigError(f"{path}: neither a run folder nor a manifest baton can read: {e}") from None
    if not isinstance(run, dict) or not (run.get("dir") or run.get("name")):
        raise ConfigError(f"{path}: a manifest names its run folder in run.dir or run.name; this one does not")
    return Path(str(run.get("dir") or f"runs/{run['name']}")).resolve()


def status_data(run_dir: Path) -> dict[str, Any]:
    """The run as `baton status --json` gives it: per stage its state, progress (read from metrics.jsonl while it
    runs), metrics, digests, tries and Slurm job; the shared eval sets side by side; the decisions taken."""
    data = load(run_dir)
    jobs: dict[str, dict[str, str]] = {}
    if any(e.get("slurm") for e in data["stages"].values()):
        from launcher.slurm.jobs import slurm_states

        jobs = slurm_states(data["stages"])
    stages = []
    alive = ledger.held(run_dir)
    stale = stale_stages(data)
    for name, e in data["stages"].items():
        attempts = e.get("attempts") or []
        progress = read_progress(stage_dir(run_dir, name), (attempts or [{}])[-1].get("started"))
        state = ledger.shown_state(e, alive)
        inputs = [{"input": key, **{k: ref.get(k) for k in ("source", "stage", "path", "digest") if ref.get(k)}}
                  for key, value in (e.get("inputs") or {}).items() if key != "data" for ref in refs(value)]
        stage = {"name": name, "kind": e.get("kind"), "state": state,
                 "on_disk": disk_state(run_dir, name, e) if state == "done" and e.get("output") else None,
                 "steps": e.get("steps") if state == "done" else progress.step,
                 "progress": progress.as_dict(), "metrics": e.get("metrics") or {}, "inputs": inputs,
                 "data": (e.get("inputs") or {}).get("data") or {}, "output": (e.get("output") or {}).get("digest"),
                 "tries": len(attempts), "started": attempts[0].get("started") if attempts else None,
                 "ended": attempts[-1].get("ended") if attempts else None, "slurm": jobs.get(name),
                 "stale": stale.get(name)} | ({k: e.get(k) for k in ("best_step", "last_metrics", "stopped_early")}
                                             if state == "done" else {})
        stages.append({k: v for k, v in stage.items() if v is not None})
    return {"version": 1, "run": data.get("run"), "run_dir": str(run_dir.resolve()), "manifest": data.get("manifest"),
            "stages": stages, "shared_evals": shared(data), "decisions": decided(data)}


WIDTH = 80  # `baton status` fits a terminal of this many columns; `--wide` shows every column, whole


def status(run_dir: Path, wide: bool = False) -> str:
    """`status_data` as tables: by default stage, kind, state, steps, tries and metrics, cut to fit `WIDTH`
    columns; `wide` adds the digests, the start-up time and cuts nothing. A stage that runs shows its
    step/max steps, and its loss and ETA in place of metrics."""
    st = status_data(run_dir)
    head = ("stage", "kind", "state", "steps", "tries", "metrics")
    rows: list[tuple[str, ...]] = [head + (("input -> output", "launch -> step 1") if wide else ())]
    slurm = any("slurm" in s for s in st["stages"])
    if slurm:
        rows[0] += ("slurm",)
    shared = set(st["shared_evals"])  # the shared eval sets' metrics have a table of their own
    for s in st["stages"]:
        progress = s["progress"]
        own = [(k, v) for k, v in s["metrics"].items() if k.split("/")[0] not in shared]  # see below
        shown = ", ".join(f"{k} {number(v)}" for k, v in own)  # in the order the stage gave them
        if s["state"] == "running":
            shown = ", ".join(filter(None, [f"loss {number(progress['loss'])}" if "loss" in progress else "",
                                            f"eta {duration(progress['eta_s'])}" if "eta_s" in progress else "",
                                            shown]))
        steps = str(s.get("steps", "-")) + (f" (best {s['best_step']})" if "best_step" in s else "")
        if s["state"] != "done" and progress.get("max_steps"):
            steps = f"{progress.get('step', 0)}/{progress['max_steps']}"
        mark = ON_DISK.get(s.get("on_disk") or "") or ("stale" if s.get("stale") else None)
        row: tuple[str, ...] = (s["name"], s.get("kind") or "?", s["state"] + (f" ({mark})" if mark else ""), steps,
               str(s["tries"]), shown or "-")
        if wide:
            inputs = [i for i in dict.fromkeys(short(ref.get("digest")) for ref in s["inputs"]) if i != "-"]
            startup = progress.get("startup_s")
            row += (f"{','.join(inputs or ['data'])} -> {short(s.get('output'))}",
                    "-" if startup is None else f"{startup:.1f} s")
        job = s.get("slurm") or {}
        rows.append(row + ((f"{job['job_id']} {job['state']}" + (f" ({job['reason']})" if job.get("reason") else "")
                            if job else "-",) if slurm else ()))
    width = None if wide else WIDTH
    title = f"run {st['run'] or '?'}  ({run_dir})"
    if width is not None and len(title) > width:
        title = f"run {st['run'] or '?'}\n{run_dir}"  # a path is shown whole, even past the width: it is copied
    tables = [_table(rows, width), _shared_table(st["shared_evals"], width), _decisions(st["decisions"], width)]
    return "\n\n".join([title + "\n" + tables[0], *filter(None, tables[1:])])


def duration(seconds: float) -> str:
    """3 s, 4m05s, 2h07m: an ETA as a person reads it."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def shared(data: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{shared eval set: {done stage: {metric: value}}}: what each stage bought on the same eval sets."""
    done = {n: e.get("metrics") or {} for n, e in data["stages"].items() if e.get("state") == "done"}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in data.get("evals") or []:
        scored = {stage: {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{name}/")}
                  for stage, m in done.items()}
        out[name] = {stage: m for stage, m in scored.items() if m}
    return out


def decided(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ledger's decisions, each event with its one-line description beside it."""
    return {name: {**rec, "events": [{**e, "text": describe(e)} for e in rec.get("events", [])]}
            for name, rec in (data.get("decisions") or {}).items()}


def shared_columns(shared: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """`status_data`'s shared evals as columns `<set>/<metric>` and a row {column: value} per stage scored."""
    columns = [f"{name}/{m}" for name, scored in shared.items()
               for m in dict.fromkeys(m for metrics in scored.values() for m in metrics)]
    stages = list(dict.fromkeys(stage for scored in shared.values() for stage in scored))
    rows = [(stage, {f"{name}/{m}": v for name, scored in shared.items() for m, v in scored.get(stage, {}).items()})
            for stage in stages]
    return columns, rows


def decision_lines(decided: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(stage, line) for each decision taken: the gates' checks with their numbers, retries, fallbacks, the chosen
    variants, and what each gate's stage hands on."""
    lines = []
    for name, rec in decided.items():
        lines += [(name, e["text"]) for e in rec["events"]]
        outcome = {"pass": f"hands on {rec.get('hand_on')}", "pending": f"waiting for {rec.get('next')}",
                   "fallback": f"hands on {rec.get('hand_on')} (fallback {rec.get('fallback')})",
                   "stop": f"STOPPED THE RUN: {rec.get('reason')}"}.get(str(rec.get("outcome")), "?")
        lines.append((name, outcome))
    return lines


def _shared_table(shared: dict[str, dict[str, dict[str, Any]]], width: int | None) -> str:
    columns, rows = shared_columns(shared)
    if not columns:
        return ""
    return _table([("shared evals", *columns)] + [(stage, *(number(m[c]) if c in m else "-" for c in columns))
                                                  for stage, m in rows], width)


def _decisions(decided: dict[str, dict[str, Any]], width: int | None) -> str:
    lines = decision_lines(decided)
    if not lines:
        return ""
    if width is None:
        return "decisions\n" + "\n".join(f"  {name}: {line}" for name, line in lines)
    return "decisions\n" + "\n".join(textwrap.fill(f"{name}: {line}", width, initial_indent="  ",
                                                    subsequent_indent="    ", break_on_hyphens=False)
                                      for name, line in lines)


def verify(run_dir: Path) -> tuple[str, bool]:
    """Hash every done stage's final/ again and compare with the ledger: (one line per stage, all intact). A stage
    found damaged is recorded as such (`ledger.mark_damaged`), so that status and lineage show it and the next run
    reruns it with its descendants; one already recorded stays so until it is rerun."""
    data = load(run_dir)
    lines, found = [], {}
    for name, e in data["stages"].items():
        out = e.get("output") or {}
        if e.get("state") == "damaged":
            lines.append(f"{name}: DAMAGED (recorded: {e.get('damage')})")
            found[name] = ""
            continue
        if e.get("state") != "done" or not out.get("digest"):
            lines.append(f"{name}: - (state {e.get('state', '?')}; no output to verify)")
            continue
        final = final_dir(stage_dir(run_dir, name))
        if not final.is_dir():
            lines.append(f"{name}: missing: {final} (recorded {short(out['digest'])})")
            found[name] = "final/ is missing"
            continue
        now = dir_digest(final)
        if now == out["digest"]:
            lines.append(f"{name}: ok {short(now)}")
            continue
        changes = stat_changes(out["stat"], folder_stat(final)) if out.get("stat") is not None else []
        lines.append(f"{name}: DAMAGED: recorded {short(out['digest'])} now {short(now)}"
                     + (f" ({', '.join(changes[:3])}{' …' if len(changes) > 3 else ''})" if changes else ""))
        found[name] = (f"{', '.join(changes[:3])} since it was recorded" if changes else
                       f"final/ holds {short(now)}, not the recorded {short(out['digest'])}") + " (found by verify)"
    new = {name: why for name, why in found.items() if why}
    if new:
        lines.append(_record_damage(run_dir, new))
    return "\n".join(lines), not found


def _record_damage(run_dir: Path, found: dict[str, str]) -> str:
    try:
        with Ledger(run_dir) as led:
            marked = [name for name, why in found.items() if ledger.mark_damaged(led.stage(name), why)]
            if marked:
                led.save()
    except LedgerError as e:
        return f"not recorded in the ledger: {e}"
    return f"recorded as damaged: {', '.join(marked)}; the next `baton run` reruns it and its descendants" \
        if marked else ""


def number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows: list[tuple[str, ...]], width: int | None = None) -> str:
    """Columns two spaces apart. Given a `width`, cells are cut (…) until a line fits it: those of the last column
    (the metrics) first, down to 24 characters, then those of the widest column."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    while width is not None and sum(widths) + 2 * (len(widths) - 1) > width and max(widths) > 4:
        cut = len(widths) - 1 if widths[-1] > 24 else max(range(len(widths)), key=lambda i: (widths[i], i))
        widths[cut] -= 1
    return "\n".join("  ".join(_cut(c, w).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _cut(cell: str, width: int) -> str:
    return cell if len(cell) <= width else cell[:width - 1] + "…"
