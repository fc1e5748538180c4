"""`baton lineage`: the run's lineage graph (which checkpoint, folder and file fed which stage, with digests, and
the decisions that chose what was handed on) and its renderings: text, JSON, Mermaid, and a picture (SVG/PNG).

`graph` reads the run folder alone (the ledger, and the sizes and mtimes of the stages' final/ folders: no hashing,
no torch), so it answers in well under a second; every rendering is a pure function of its dict. matplotlib is
imported inside `picture` only, so `baton status` never pays for it.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from contract.files import json_safe, short
from launcher import ledger
from launcher.decisions import describe
from launcher.decisions import superseded as decided_otherwise
from launcher.errors import LedgerError
from launcher.plan import disk_state

VERSION = 1  # of the graph dict (`baton lineage --json`)
# marks of a stage whose final/ differs: by size or mtime, or found by a hash (state damaged)
ON_DISK = {"changed": "CHANGED ON DISK", "missing": "final/ MISSING", "damaged": "DAMAGED"}
_VARIANT = re.compile(r"@v\d+$")


def load(run_dir: Path) -> dict[str, Any]:
    """The run folder's ledger, or a clear error when `run_dir` is no run folder."""
    if not (run_dir / ledger.LEDGER).is_file():
        raise LedgerError(f"{run_dir}: no {ledger.LEDGER} here; is this a run folder (runs/<name>)?")
    return ledger.read(run_dir)


def refs(value: Any) -> list[dict[str, Any]]:
    """An input's references: one, or a list (ensemble members …)."""
    return value if isinstance(value, list) else [value] if value else []


def render(run_dir: Path, fmt: str) -> bytes:
    """`baton lineage`: the lineage in format `fmt` (text, json, mermaid, svg, png)."""
    g = graph(run_dir)
    if fmt in ("svg", "png"):
        return picture(g, fmt)
    shown = json.dumps(g, indent=2, allow_nan=False) if fmt == "json" else mermaid(g) if fmt == "mermaid" else text(g)
    return (shown.rstrip("\n") + "\n").encode("utf-8")


# ----------------------------------------------------------------- the graph


def graph(run_dir: Path) -> dict[str, Any]:
    """The lineage as plain JSON-able data: {"version", "run", "nodes" (stages and their attempts and variants),
    "sources" (pretrained folders, configs, data files), "edges" (what fed what: input key, digest, state),
    "decisions" (each gate's and selection's events and outcome)}.

    An edge's state: ok; stale (the upstream stage now gives another digest); changed or missing (the upstream's
    final/ differs from its record by size or mtime); unknown (no such record: `baton verify` hashes). Data files
    are not looked at (their digests are as the stage recorded them). `named`: the manifest stage whose hand-on
    this was, when a decision handed on another instance (`handed_on`: passed, the retry attempt that passed its
    gate; selected, the chosen variant; fallback, the fallback stage's output)."""
    data = load(run_dir)
    stages: dict[str, dict[str, Any]] = data["stages"]
    decisions: dict[str, dict[str, Any]] = data.get("decisions") or {}
    verdicts = _verdicts(decisions)
    alive = ledger.held(run_dir)
    nodes = [_node(run_dir, name, e, verdicts.get(name)) | {"state": ledger.shown_state(e, alive)}
             for name, e in stages.items()]
    sources: dict[str, dict[str, Any]] = {}  # by id
    edges: list[dict[str, Any]] = []

    def source(kind: str, path: str, digest: str | None) -> str:
        """The id of the source of this kind, path and content, added on first sight (a file read again after it
        changed is another source)."""
        same = [s for s in sources.values() if s["type"] == kind and s["path"] == path]
        found = next((s for s in same if s["digest"] == digest), None)
        if found is None:
            sid = f"{kind}:{path}" + (f"#{short(digest)}" if same else "")
            found = sources[sid] = {"id": sid, "type": kind, "path": path, "digest": digest}
        return str(found["id"])

    for name, e in stages.items():
        for key, value in (e.get("inputs") or {}).items():
            if key == "data":
                edges += [_edge(source("data", path, d), name, key, d, "ok") for path, d in (value or {}).items()]
                continue
            for ref in refs(value):
                if ref.get("source") == "stage":
                    edges.append(_stage_edge(run_dir, name, key, ref, stages, decisions))
                elif ref.get("source") == "pretrained":
                    sid = source("pretrained", str(ref.get("path")), ref.get("digest"))
                    edges.append(_edge(sid, name, key, ref.get("digest"), "ok"))
                else:  # built from a config the manifest gives (the ledger keeps its digest in the settings)
                    edges.append(_edge(source("config", f"{name}/{key}", None), name, key, None, "ok"))
    known = {n["name"] for n in nodes}
    for edge in edges:  # a stage read that the ledger no longer lists: a node all the same, so every edge has ends
        upstream = edge["from"].removeprefix("stage:")
        if edge["from"].startswith("stage:") and upstream not in known:
            known.add(upstream)
            nodes.append({"id": edge["from"], "name": upstream, "kind": None, "state": "absent",
                          "stage": _group(upstream), "role": _role(upstream), "output": None, "on_disk": None,
                          "gate": None})
    run = {"name": data.get("run"), "dir": str(run_dir.resolve()), "manifest": data.get("manifest"),
           "manifest_digest": data.get("manifest_digest"), "evals": list(data.get("evals") or [])}
    return json_safe({"version": VERSION, "run": run, "nodes": nodes, "sources": list(sources.values()),
                      "edges": edges, "decisions": [_decision(name, rec) for name, rec in decisions.items()]})


def _node(run_dir: Path, name: str, e: dict[str, Any], gate: str | None) -> dict[str, Any]:
    out = e.get("output")
    done = e.get("state") == "done" and bool(out)
    return {"id": f"stage:{name}", "name": name, "kind": e.get("kind"), "state": e.get("state"),
            "stage": _group(name), "role": _role(name),
            "output": {"path": out.get("path"), "digest": out.get("digest")} if out else None,
            "on_disk": "damaged" if e.get("state") == "damaged" else disk_state(run_dir, name, e) if done else None,
            "gate": gate}


def _group(name: str) -> str:
    """The manifest's stage of an instance (`ft@2`, `ft@v1` -> `ft`): @ is refused in stage names."""
    return name.split("@", 1)[0]


def _role(name: str) -> str:
    return "stage" if "@" not in name else "variant" if _VARIANT.search(name) else "retry"


def _verdicts(decisions: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{instance: passed | failed | stopped | selected | not selected}: what the decisions made of it."""
    out: dict[str, str] = {}
    for rec in decisions.values():
        for ev in rec.get("events", []):
            if ev.get("kind") == "select":
                out |= {n: "selected" if n == ev.get("chosen") else "not selected" for n in ev.get("values") or {}}
            elif ev.get("attempt"):
                out[ev["attempt"]] = "passed" if ev.get("passed") else "stopped" if ev.get("action") == "stop" \
                    else "failed"
    return out


def _edge(src: str, name: str, key: str, digest: str | None, state: str, now: str | None = None,
          named: str | None = None, handed_on: str | None = None) -> dict[str, Any]:
    return {"from": src, "to": f"stage:{name}", "key": key, "digest": digest, "state": state, "now": now,
            "named": named, "handed_on": handed_on}


def _stage_edge(run_dir: Path, name: str, key: str, ref: dict[str, Any], stages: dict[str, Any],
                decisions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An earlier stage's final/ read by stage `name`. state: ok, stale (the upstream now gives another digest),
    changed or missing (its files differ by size or mtime), unknown (no stat record: `baton verify` hashes)."""
    upstream = stages.get(ref["stage"], {})
    now = (upstream.get("output") or {}).get("digest")
    superseded = decided_otherwise({"stages": stages, "decisions": decisions}, ref)
    state = "stale" if now != ref.get("digest") or superseded else "damaged" if upstream.get("state") == "damaged" \
        else disk_state(run_dir, ref["stage"], upstream)
    named = ref.get("named")
    rec = decisions.get(named or "") or {}
    why = None if not named else "fallback" if rec.get("outcome") == "fallback" else \
        "selected" if any(ev.get("kind") == "select" for ev in rec.get("events", [])) else "passed"
    edge = _edge(f"stage:{ref['stage']}", name, key, ref.get("digest"), state,
                 now=now if state == "stale" and not superseded else None, named=named, handed_on=why)
    if superseded:
        edge["why"] = superseded
    return edge


def _decision(name: str, rec: dict[str, Any]) -> dict[str, Any]:
    return {"stage": name, "outcome": rec.get("outcome"), "hand_on": rec.get("hand_on"), "next": rec.get("next"),
            "fallback": rec.get("fallback"), "reason": rec.get("reason"),
            "events": [ev | {"text": describe(ev)} for ev in rec.get("events", [])]}


# ----------------------------------------------------------------- text and Mermaid


def text(g: dict[str, Any]) -> str:
    """What `baton lineage` prints: each stage, what fed it (with the state of that hand-on), what it gave, and
    the decisions taken on it."""
    run = g["run"]
    lines = [f"run {run.get('name') or '?'}  manifest {run.get('manifest') or '?'} {short(run.get('manifest_digest'))}"]
    sources = {s["id"]: s for s in g["sources"]}
    listed = [n for n in g["nodes"] if n["state"] != "absent"]
    names = {n["name"] for n in listed}
    # a decision's lines go under its stage, or (variants: no instance has the stage's name) under its last instance
    home = {d["stage"]: d["stage"] if d["stage"] in names else
            next((n["name"] for n in reversed(listed) if n["stage"] == d["stage"]), None) for d in g["decisions"]}
    for node in listed:
        lines.append(f"{node['name']} [{node['kind'] or '?'}] {node['state'] or '?'}")
        for edge in (e for e in g["edges"] if e["to"] == node["id"]):
            lines.append(_input_line(edge, sources.get(edge["from"])))
        out = node["output"]
        if out:
            mark = ON_DISK.get(node["on_disk"] or "")
            lines.append(f"  -> {out['path']}  {short(out['digest'])}" + (f"  ({mark})" if mark else ""))
        for d in g["decisions"]:
            if home[d["stage"]] == node["name"]:
                lines += [f"  decided: {ev['text']}" for ev in d["events"]]
    return "\n".join(lines)


def _input_line(edge: dict[str, Any], src: dict[str, Any] | None) -> str:
    key, digest = edge["key"], short(edge["digest"])
    if src is None:  # an earlier stage's final/
        upstream = edge["from"].removeprefix("stage:")
        if edge["state"] == "stale" and edge.get("why"):  # made under a decision taken otherwise since
            mark = f"STALE: the decision on {edge.get('named') or _group(upstream)} no longer hands it on"
        elif edge["state"] == "stale":
            mark = f"STALE: {upstream} now gives {short(edge['now'])}"
        else:  # the digests agree; do the files still? (sizes and mtimes only: `baton verify` hashes)
            mark = ON_DISK.get(edge["state"]) or \
                ("ok" if edge["state"] == "ok" else "ok as recorded; `baton verify` checks files")
        via = f"; handed on for {edge['named']}" if edge.get("named") else ""
        return f"  <- {key} {upstream}/final  {digest}  ({mark}{via})"
    if src["type"] == "config":
        return f"  <- {key} built from a config"
    return f"  <- {key} {src['path']}  {digest}"


COLOURS = {  # fill, by state: done green, running blue, failed red, preempted orange, the rest grey
    "done": "#c8e6c9", "running": "#bbdefb", "queued": "#e3f2fd", "requeued": "#e3f2fd", "failed": "#ffcdd2",
    "preempted": "#ffe0b2", "interrupted": "#ffe0b2", "damaged": "#f8bbd0",
    "pending": "#eeeeee", "cancelled": "#e0e0e0", "skipped": "#e0e0e0", "absent": "#ffffff",
}
_VERDICT = {"passed": "gate passed", "failed": "gate failed", "stopped": "gate STOPPED THE RUN"}  # as boxes say it
_MERMAID_CLASS = {"queued": "running", "requeued": "running", "cancelled": "pending", "skipped": "pending"}


def mermaid(g: dict[str, Any]) -> str:
    """A Mermaid `flowchart LR`: stages as boxes classed by state (a stopping gate in red, the selected variant
    bold), pretrained folders as subroutines, configs as hexagons, data files as cylinders; edges labelled with
    the input key and digest; fallbacks dashed, hand-ons of a chosen variant thick, retries dotted."""
    ids = {n["id"]: f"n{i}" for i, n in enumerate(g["nodes"])} | {s["id"]: f"s{i}" for i, s in enumerate(g["sources"])}
    lines = ["flowchart LR"]
    for n in g["nodes"]:
        extra = f"<br/>{_VERDICT.get(n['gate'], n['gate'])}" if n["gate"] else ""
        label = f"{_esc(n['name'])}<br/>{_esc(n['kind'] or '?')} · {_esc(n['state'] or '?')}" + \
            (f"<br/>{short((n['output'] or {}).get('digest'))}" if n["output"] else "") + extra
        cls = "stopped" if n["gate"] == "stopped" else _MERMAID_CLASS.get(n["state"], n["state"])
        lines.append(f'  {ids[n["id"]]}["{label}"]:::{cls if cls in COLOURS else "pending"}')
    shapes = {"data": ('[("', '")]'), "pretrained": ('[["', '"]]'), "config": ('{{"', '"}}')}
    for s in g["sources"]:
        opening, closing = shapes[s["type"]]
        label = f"config of {_esc(s['path'])}" if s["type"] == "config" else \
            f"{_esc(s['path'])}<br/>{short(s['digest'])}"
        lines.append(f"  {ids[s['id']]}{opening}{label}{closing}:::source")
    for (src, dst), group in _bundles(g["edges"]).items():
        arrow = {"fallback": "-.->", "selected": "==>"}.get(group[0].get("handed_on") or "", "-->")
        lines.append(f'  {ids[src]} {arrow}|"{_esc(_edge_label(group, " · "))}"| {ids[dst]}')
    retries = [(ids[f"stage:{a}"], ids[f"stage:{b}"]) for a, b in _retries(g)
               if f"stage:{a}" in ids and f"stage:{b}" in ids]
    lines += [f'  {a} -.->|"retry"| {b}' for a, b in retries]
    lines += [f"  style {ids[n['id']]} stroke-width:4px" for n in g["nodes"] if n["gate"] == "selected"]
    lines += [f"  classDef {state} fill:{fill},stroke:#555" for state, fill in COLOURS.items()
              if state not in _MERMAID_CLASS]
    lines += ["  classDef stopped fill:#ffcdd2,stroke:#c62828,stroke-width:3px",
              "  classDef source fill:#fafafa,stroke:#999"]
    lines += [f"  linkStyle {len(_bundles(g['edges'])) + i} stroke:#999" for i in range(len(retries))]
    return "\n".join(lines) + "\n"


def _bundles(edges: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The edges by (from, to): one arrow for a folder read as init and as tokenizer."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in edges:
        out.setdefault((e["from"], e["to"]), []).append(e)
    return out


def _edge_label(group: list[dict[str, Any]], sep: str) -> str:
    """`init, tokenizer 811638a95d21 · selected for finetune`: the keys of one arrow, each digest once, its marks."""
    parts = []
    for digest in dict.fromkeys(e["digest"] for e in group):
        keys = ", ".join(e["key"] for e in group if e["digest"] == digest)
        parts.append(f"{keys} {short(digest)}" if digest else keys)
    marks = dict.fromkeys(_MARKS[e["state"]] for e in group if e["state"] in _MARKS)
    first = group[0]
    why = [f"{first['handed_on']} for {first['named']}"] if first.get("handed_on") else []
    return sep.join([" ".join(["; ".join(parts), *marks]), *why])


_MARKS = {"stale": "STALE", "changed": "CHANGED", "missing": "MISSING", "damaged": "DAMAGED"}


def _retries(g: dict[str, Any]) -> list[tuple[str, str]]:
    """(failed attempt, the attempt run after it) of every retry the gates asked for."""
    return [(ev["attempt"], ev["next"]) for d in g["decisions"] for ev in d["events"]
            if ev.get("action") == "retry" and ev.get("next")]


def _esc(label: str) -> str:
    """A label safe inside Mermaid's quotes: entity codes for what Mermaid or HTML would read as syntax."""
    return "".join(f"#{ord(c)};" if c in '"#<>&|`[]{}' else " " if c < " " else c for c in str(label))


# ----------------------------------------------------------------- the picture


def picture(g: dict[str, Any], fmt: str) -> bytes:
    """The graph drawn left to right ("svg" or "png"): stages as boxes coloured by state with kind and output
    digest, each source one column before its first reader, arrows labelled with the input key and digest;
    fallbacks dashed, the selected variant bold, a stopping gate red, retries dotted between their attempts."""
    if fmt not in ("svg", "png"):
        raise ValueError(f"lineage picture: format {fmt!r}; svg or png")
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    column, row, rows = _layout(g)
    width, height = 0.6 + _COLUMN * (max(column.values(), default=0) + 1), 0.9 + _ROW * max(rows, 1)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # Agg, never a display
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")

    def at(ident: str) -> tuple[float, float]:
        return 0.3 + _COLUMN * (column[ident] + 0.5), height - 0.7 - _ROW * (row[ident] + 0.5)

    run = g["run"]
    ax.text(0.15, height - 0.25, f"run {run.get('name') or '?'}  manifest {short(run.get('manifest_digest'))}",
            fontsize=9, va="center", gid="title", parse_math=False)
    boxes = {}
    for i, n in enumerate(g["nodes"]):
        gate = _VERDICT.get(n["gate"], n["gate"])
        label = "\n".join(filter(None, [n["name"], f"{n['kind'] or '?'} · {n['state']}",
                                        n["output"] and f"out {short(n['output']['digest'])}", gate and str(gate)]))
        edge, lw = {"stopped": ("#c62828", 2.5), "selected": ("#1b5e20", 2.5)}.get(n["gate"] or "", ("#555", 0.8))
        box = {"boxstyle": "round,pad=0.45", "fc": COLOURS.get(n["state"], "#eeeeee"), "ec": edge, "lw": lw,
               "ls": "--" if n["gate"] in ("failed", "not selected") else "-"}
        boxes[n["id"]] = _box(ax, at(n["id"]), label, f"stage-{i}", box, fontsize=7.5)
    for i, s in enumerate(g["sources"]):
        label = f"config\n({s['path']})" if s["type"] == "config" else \
            f"{_tail(s['path'])}\n{short(s['digest'])}" if s["digest"] else _tail(s["path"])
        box = {"boxstyle": "round4,pad=0.35" if s["type"] == "data" else "square,pad=0.35", "fc": "#fafafa",
               "ec": "#999", "lw": 0.8}
        boxes[s["id"]] = _box(ax, at(s["id"]), label, f"source-{i}", box, fontsize=6.5, color="#333")
    fig.draw_without_rendering()  # places the boxes: their extents, for routing the arrows around them
    extents = {ident: ax.transData.inverted().transform(b.get_bbox_patch().get_window_extent())
               for ident, b in boxes.items()}

    def arrow(a: str, b: str, style: tuple[str, float, str], label: str) -> None:
        sides = _sides(at(a), at(b), extents[a], extents[b])
        bend = _bend(*sides, [box for ident, box in extents.items() if ident not in (a, b)])
        _arrow(ax, sides, bend, style, label)

    for (src, dst), group in _bundles(g["edges"]).items():
        e = group[0]
        style = {"fallback": ("#e65100", 1.4, "--"), "selected": ("#1b5e20", 2.2, "-")}.get(
            e.get("handed_on") or "", ("#c62828", 1.2, "-") if e["state"] in _MARKS else ("#777", 0.8, "-"))
        label = _edge_label(group, "\n")
        if src.startswith("data:"):  # its box says its digest: a plain line keeps the picture readable
            style, label = ("#bbb", 0.6, "-"), ""
        arrow(src, dst, style, label)
    for a, b in _retries(g):
        if f"stage:{a}" in boxes and f"stage:{b}" in boxes:
            arrow(f"stage:{a}", f"stage:{b}", ("#999", 1.0, ":"), "retry")
    out = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "baton"}):  # text stays text; stable ids
        fig.savefig(out, format=fmt, dpi=110, bbox_inches="tight", pad_inches=0.1,
                    metadata={"Date": None} if fmt == "svg" else {})
    return out.getvalue()


def svg(run_dir: Path) -> str:
    """The run's lineage picture as SVG text (from `<svg`, no XML prolog): for embedding in an HTML page."""
    drawn = picture(graph(run_dir), "svg").decode("utf-8")
    return drawn[drawn.index("<svg"):]


_COLUMN, _ROW = 2.7, 0.95  # inches per column (one generation of stages) and per row


def _layout(g: dict[str, Any]) -> tuple[dict[str, int], dict[str, int], int]:
    """(column, row of each node and source, rows in the tallest column). Stages by generation (longest chain of
    stages before them); retries and variants, reading the same inputs, stack in one column. A source sits one
    column before its first reader; rows follow the mean row of what feeds them, to keep lines short."""
    import networkx as nx

    stages = nx.DiGraph()
    stages.add_nodes_from(n["id"] for n in g["nodes"])
    stages.add_edges_from((e["from"], e["to"]) for e in g["edges"] if e["from"] in stages)
    if nx.is_directed_acyclic_graph(stages):
        column = {n: k + 1 for k, gen in enumerate(nx.topological_generations(stages)) for n in gen}
    else:  # a hand-edited ledger; the ledger's order then
        column = {n["id"]: k + 1 for k, n in enumerate(g["nodes"])}
    for s in g["sources"]:
        column[s["id"]] = min((column[e["to"]] for e in g["edges"] if e["from"] == s["id"]), default=1) - 1
    if not any(c == 0 for c in column.values()):
        column = {n: c - 1 for n, c in column.items()}
    order = [n["id"] for n in g["nodes"]] + [s["id"] for s in g["sources"]]
    feeds: dict[str, list[str]] = {}
    for e in g["edges"]:
        feeds.setdefault(e["to"], []).append(e["from"])
    row: dict[str, int] = {}

    def mean_row(n: str) -> tuple[bool, float, int]:
        above = [row[f] for f in feeds.get(n, []) if f in row]
        mean = sum(above) / len(above) if above else order.index(n) / len(order)
        return not n.startswith("stage:"), mean, order.index(n)  # stages first, then the sources

    tallest = 0
    for c in sorted(set(column.values())):
        members = sorted((n for n in order if column[n] == c), key=mean_row)
        row |= {n: k for k, n in enumerate(members)}
        tallest = max(tallest, len(members))
    for c in set(column.values()):  # the sources again, now by the rows of their readers
        first = sum(1 for n in row if column[n] == c and n.startswith("stage:"))
        sources = [n for n in order if column[n] == c and not n.startswith("stage:")]
        readers = {n: [row[e["to"]] for e in g["edges"] if e["from"] == n] for n in sources}
        sources.sort(key=lambda n: (sum(readers[n]) / max(len(readers[n]), 1), order.index(n)))
        row |= {n: first + k for k, n in enumerate(sources)}
    return column, row, tallest


def _box(ax: Any, xy: tuple[float, float], label: str, gid: str, box: dict[str, Any], **style: Any) -> Any:
    """A label in a box, centred on `xy`; `gid` names its group in the SVG. Names are shown as they are (a `$` in
    one starts no mathtext)."""
    return ax.text(*xy, label, ha="center", va="center", zorder=3, gid=gid, bbox=box, parse_math=False, **style)


Point = tuple[float, float]


def _sides(pa: Point, pb: Point, a: Any, b: Any) -> tuple[Point, Point]:
    """Where an arrow from box `a` (centre `pa`) to box `b` leaves and arrives (boxes as [[x0, y0], [x1, y1]]):
    from side to side, or, in one column, from bottom to top (or top to bottom)."""
    if abs(pa[0] - pb[0]) > 1e-6:
        return (float(a[1][0]), pa[1]), (float(b[0][0]), pb[1])
    down = pa[1] > pb[1]
    return (pa[0], float(a[0][1] if down else a[1][1])), (pb[0], float(b[1][1] if down else b[0][1]))


def _curve(start: Point, end: Point, bend: float, t: float) -> Point:
    """The point at `t` (0 … 1) of matplotlib's arc3 connection with rad `bend`: a quadratic Bézier whose control
    point is the chord's midpoint moved by `bend` times the chord, turned a quarter."""
    (x0, y0), (x1, y1) = start, end
    cx, cy = (x0 + x1) / 2 + bend * (y1 - y0), (y0 + y1) / 2 - bend * (x1 - x0)
    u = 1 - t
    return u * u * x0 + 2 * u * t * cx + t * t * x1, u * u * y0 + 2 * u * t * cy + t * t * y1


def _bend(start: Point, end: Point, others: list[Any]) -> float:
    """The least bend (arc3's rad) of an arrow from `start` to `end` that crosses none of the `others` boxes, so no
    box hides it: 0 for a straight line where nothing is in the way; beside a column's boxes, arrows within the
    column curve to one side. The least-crossing bend when every one crosses some."""
    def crossings(bend: float) -> int:
        points = [_curve(start, end, bend, k / 40) for k in range(1, 40)]
        return sum(any(x0 - 0.03 < x < x1 + 0.03 and y0 - 0.03 < y < y1 + 0.03 for x, y in points)
                   for (x0, y0), (x1, y1) in others)

    same_column = abs(start[0] - end[0]) < 1e-6
    bends = [0.25] if same_column else [0.0]
    bends += [sign * b for b in (0.15, 0.25, 0.35, 0.5, 0.7) for sign in (1, -1)]
    return min(bends, key=lambda b: (crossings(b), bends.index(b)))


def _arrow(ax: Any, sides: tuple[Point, Point], bend: float, style: tuple[str, float, str], label: str) -> None:
    """An arrow between `sides` (`_sides`: from one box's side to another's), bent by `bend` (`_bend`), its label
    at its middle."""
    color, lw, ls = style
    (x0, y0), (x1, y1) = sides
    ax.annotate("", xy=(x1, y1), xycoords="data", xytext=(x0, y0), textcoords="data", zorder=1, arrowprops={
        "arrowstyle": "-|>", "color": color, "lw": lw, "ls": ls, "shrinkA": 1, "shrinkB": 1,
        "connectionstyle": f"arc3,rad={bend}"})
    if not label:
        return
    ax.text(*_curve(sides[0], sides[1], bend, 0.5), label, ha="center", va="center", fontsize=6, color=color,
            zorder=2, parse_math=False, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                              "alpha": 0.85})


def _tail(path: str) -> str:
    """A source's path as a box shows it: the last two parts of a long path."""
    parts = Path(path).parts
    return path if len(path) <= 28 or len(parts) <= 2 else str(Path("…", *parts[-2:]))
