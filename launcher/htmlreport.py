"""`baton report`: one self-contained HTML page about a run folder (no server, no network: plotly's JS is inlined).

Read top to bottom: what the ledger and each stage's metrics.jsonl say (`curves`), then the figures, then
the tables, then the page. Read-only, like `baton status`; plotly is imported only inside `build`.
"""

from __future__ import annotations

import bisect
import datetime as dt
import html
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.files import file_digest, short
from contract.layout import EXIT_STOPPED, read_metrics, stage_dir, step_of
from launcher import lineage, report, summary

STEPPED = ("train", "eval", "checkpoint", "stop", "mixing", "loss_terms", "draw")  # records a resume can supersede


# ----------------------------------------------------------------- what the run folder says


def final_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stage's metrics.jsonl records as the stage finally stands: each `start` (a resume at step s, or a start
    over at 0 in the same file) supersedes the earlier records of steps past s."""
    kept: list[dict[str, Any]] = []
    for rec in records:
        if rec.get("event") == "start":
            s = rec.get("step") or 0
            kept = [r for r in kept if r.get("event") not in STEPPED or (r.get("step") or 0) <= s]
        kept.append(rec)
    return kept


@dataclass
class Curve:
    """One stage's records placed on the run's shared x axis: `at_step` and `at_tokens` are where it begins."""

    stage: str
    kind: str
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    tokens: list[float]  # cumulative tokens at each train record
    marks: list[tuple[int, str]] = field(default_factory=list)  # (step, hover text): resumes
    at_step: float = 0
    at_tokens: float = 0
    length: int = 0  # steps

    def x(self, step: float, by: str) -> float:
        """Where a record of this stage at `step` sits on the shared axis (`by`: "step" or "tokens")."""
        if by == "step":
            return self.at_step + step
        i = bisect.bisect_right([r["step"] for r in self.train], step)
        return self.at_tokens + (self.tokens[i - 1] if i else 0)


def curves(run_dir: Path, data: dict[str, Any]) -> list[Curve]:
    """Every stage in the ledger's (run) order, placed one after another."""
    out: list[Curve] = []
    at_step = at_tokens = 0.0
    for name, e in data["stages"].items():
        records = read_metrics(stage_dir(run_dir, name))
        kept = final_records(records)
        train = [r for r in kept if r.get("event") == "train" and isinstance(r.get("step"), int)]
        evals = [r for r in kept if r.get("event") == "eval" and isinstance(r.get("step"), int)]
        tokens, total = [], 0.0
        for r in train:
            total += r.get("tokens") or 0
            tokens.append(total)
        c = Curve(name, e.get("kind", "?"), train, evals, tokens, resume_marks(e, records), at_step, at_tokens)
        c.length = max([e.get("steps") or 0] + [r["step"] for r in train + evals])
        out.append(c)
        at_step, at_tokens = at_step + c.length, at_tokens + total
    return out


def resume_marks(entry: dict[str, Any], records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Where a stage's later attempts began: resumed (the ledger's `resumed_from`) or started over (at step 0),
    and any other `start` past step 0 (a Slurm requeue inside one attempt)."""
    attempts = entry.get("attempts") or []
    marks = [(step_of(a["resumed_from"]), f"attempt {a.get('attempt')}, resumed from {a['resumed_from']}")
             if a.get("resumed_from") else (0, f"attempt {a.get('attempt')}, started over (attempt "
                                               f"{b.get('attempt')}: {b.get('outcome', '?')})")
             for b, a in zip(attempts, attempts[1:])]
    known = {s for s, _ in marks}
    marks += [(r["step"], f"restarted at step {r['step']}") for r in records
              if r.get("event") == "start" and isinstance(r.get("step"), int) and r["step"] > 0
              and r["step"] not in known]
    return marks


def manifest_text(run_dir: Path, data: dict[str, Any]) -> tuple[str, str] | None:
    """(where it was read, text) of the run's manifest: the recorded file if it still has the recorded digest,
    else the copy in the run folder."""
    recorded = Path(data.get("manifest") or "")
    if data.get("manifest") and recorded.is_file() and file_digest(recorded) == data.get("manifest_digest"):
        return str(recorded), recorded.read_text(errors="replace")
    copy = run_dir / "manifest.yaml"
    if copy.is_file():
        note = f"{copy} (the copy in the run folder; {recorded} is gone or changed)" if data.get("manifest") else ""
        return note or str(copy), copy.read_text(errors="replace")
    return None


# ----------------------------------------------------------------- the figures


def _switch(fig: Any, xs: list[tuple[list[float], list[float]]], marks: dict[str, tuple[list[Any], list[Any]]],
            bottom: str, has_tokens: bool, along: str = "stages one after another") -> None:
    """Buttons that put every trace, line and label of `fig` on steps or on tokens. `xs`: each trace's x by step and
    by tokens; `marks`: the shapes and annotations of each; `along`: what the x axis runs along."""
    titles = [a.to_plotly_json() for a in fig.layout.annotations]  # the subplots' own
    fig.update_layout(shapes=marks["step"][0], annotations=titles + marks["step"][1])
    fig.update_layout({f"{bottom}.title.text": f"step ({along})"})
    if not has_tokens:
        return
    buttons = [{"label": label, "method": "update",
                "args": [{"x": [x[i] for x in xs]},
                         {"shapes": marks[by][0], "annotations": titles + marks[by][1],
                          f"{bottom}.title.text": f"{by} ({along})"}]}
               for i, (label, by) in enumerate((("steps", "step"), ("tokens", "tokens")))]
    fig.update_layout(updatemenus=[{"type": "buttons", "direction": "right", "x": 0, "y": 1.08, "xanchor": "left",
                                    "yanchor": "bottom", "buttons": buttons, "showactive": True}])


def _stage_lines(cs: list[Curve], by: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A dotted line where each stage begins (stages of zero width share one line and one label), and a dashed
    one at each resume."""
    starts: dict[float, list[str]] = {}
    for c in cs:
        starts.setdefault(c.at_step if by == "step" else c.at_tokens, []).append(c.stage)
    shapes = [{"type": "line", "x0": x, "x1": x, "y0": 0, "y1": 1, "xref": "x", "yref": "paper",
               "line": {"dash": "dot", "width": 1, "color": "#888"}} for x in starts]
    labels = [{"x": x, "y": 1, "xref": "x", "yref": "paper", "text": " · ".join(html.escape(n) for n in names),
               "showarrow": False, "textangle": -90, "xanchor": "left", "yanchor": "top", "font": {"size": 10}}
              for x, names in starts.items()]
    shapes += [{"type": "line", "x0": c.x(s, by), "x1": c.x(s, by), "y0": 0, "y1": 1, "xref": "x", "yref": "paper",
                "line": {"dash": "dash", "width": 1, "color": "#c33"}} for c in cs for s, _ in c.marks]
    return shapes, labels


def training_figure(cs: list[Curve]) -> Any:
    """Loss, learning rate and tokens/s of every stage on one shared x axis."""
    from plotly.subplots import make_subplots

    panels = [("loss", "training loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s")]
    panels = [p for p in panels if any(isinstance(r.get(p[0]), (int, float)) for c in cs for r in c.train)]
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        row_heights=[2, 1, 1][:len(panels)], subplot_titles=[title for _, title in panels])
    xs: list[tuple[list[float], list[float]]] = []
    for k, c in enumerate(cs):
        for row, (key, _) in enumerate(panels, 1):
            points = [r for r in c.train if isinstance(r.get(key), (int, float)) and measured(r, key)]
            if not points:
                continue
            xs.append(([c.x(r["step"], "step") for r in points], [c.x(r["step"], "tokens") for r in points]))
            fig.add_scatter(x=xs[-1][0], y=[r[key] for r in points], row=row, col=1, mode="lines+markers",
                            name=c.stage, legendgroup=c.stage, showlegend=row == 1, marker={"size": 4},
                            line={"color": _color(k)}, customdata=[r["step"] for r in points],
                            hovertemplate=f"{html.escape(c.stage)} step %{{customdata}}<br>{key} %{{y:.4g}}"
                                          "<extra></extra>")
    resumes = [(c, s, text) for c in cs for s, text in c.marks]
    if resumes:  # a marker on the loss curve at each resume, its hover the attempt
        xs.append(([c.x(s, "step") for c, s, _ in resumes], [c.x(s, "tokens") for c, s, _ in resumes]))
        fig.add_scatter(x=xs[-1][0], y=[_loss_at(c, s) for c, s, _ in resumes], row=1, col=1, mode="markers",
                        name="resumes", marker={"symbol": "triangle-up", "size": 12, "color": "#c33"},
                        text=[f"{html.escape(c.stage)}: {html.escape(t)}" for c, s, t in resumes],
                        hovertemplate="%{text}<extra></extra>")
    fig.update_layout(height=240 + 160 * len(panels), margin={"t": 90}, hovermode="closest")
    _switch(fig, xs, {by: _stage_lines(cs, by) for by in ("step", "tokens")}, _axis(len(panels)),
            any(c.tokens and c.tokens[-1] for c in cs))
    return fig


def eval_figure(cs: list[Curve]) -> Any | None:
    """Each eval metric over each stage's own steps (or tokens), one panel per metric, the stages that report it
    overlaid (variants and retries side by side); None without eval records. On the run's shared axis a metric's
    panel would sit empty over every stage that does not report it."""
    from plotly.subplots import make_subplots

    names = list(dict.fromkeys(k for c in cs for r in c.evals for k, v in r.items()
                               if k not in ("event", "step", "time") and isinstance(v, (int, float))))
    if not names:
        return None
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, vertical_spacing=min(0.08, 0.3 / len(names)),
                        subplot_titles=names)
    xs: list[tuple[list[float], list[float]]] = []
    for k, c in enumerate(cs):
        for row, name in enumerate(names, 1):
            points = [r for r in c.evals if isinstance(r.get(name), (int, float))]
            if not points:
                continue
            xs.append(([r["step"] for r in points], [c.x(r["step"], "tokens") - c.at_tokens for r in points]))
            fig.add_scatter(x=xs[-1][0], y=[r[name] for r in points], row=row, col=1, mode="lines+markers",
                            name=c.stage, legendgroup=c.stage, showlegend=not any(
                                t.name == c.stage for t in fig.data), line={"color": _color(k)},
                            customdata=[r["step"] for r in points],
                            hovertemplate=f"{html.escape(c.stage)} step %{{customdata}}<br>{html.escape(name)} "
                                          "%{y:.4g}<extra></extra>")
    for row, name in enumerate(names, 1):
        values = {r[name] for c in cs for r in c.evals if isinstance(r.get(name), (int, float))}
        if len(values) == 1:  # plotly's range for one value is value ± 1: an accuracy of 0.5 on -0.5 … 1.5
            v = values.pop()
            fig.update_yaxes(range=[v - (abs(v) * 0.1 or 0.1), v + (abs(v) * 0.1 or 0.1)], row=row, col=1)
    fig.update_layout(height=140 + 200 * len(names), margin={"t": 90}, hovermode="closest")
    _switch(fig, xs, {by: ([], []) for by in ("step", "tokens")}, _axis(len(names)),
            any(c.tokens and c.tokens[-1] for c in cs), "of each stage")
    return fig


def shared_figure(columns: list[str], rows: list[tuple[str, dict[str, Any]]], order: list[str]) -> Any | None:
    """What each stage bought: a bar per stage for each shared eval metric."""
    from plotly.subplots import make_subplots

    if not columns:
        return None
    per_row = min(3, len(columns))
    fig = make_subplots(rows=-(-len(columns) // per_row), cols=per_row, subplot_titles=columns)
    for i, column in enumerate(columns):
        scored = [(n, m[column]) for n, m in rows if isinstance(m.get(column), (int, float))]
        fig.add_bar(x=[n for n, _ in scored], y=[v for _, v in scored], name=column, showlegend=False,
                    marker={"color": [_color(order.index(n)) for n, _ in scored]},
                    row=i // per_row + 1, col=i % per_row + 1, hovertemplate="%{x}: %{y:.4g}<extra></extra>")
    fig.update_layout(height=340 * (-(-len(columns) // per_row)))
    return fig


def measured(record: dict[str, Any], key: str) -> bool:
    """False for a rate of a train record that measured no time: the first log after a (re)start, before its
    rate window had begun (older stages wrote 0 there; now the record has no rates)."""
    return key not in ("tokens_per_s", "steps_per_s", "mfu") or record.get("steps_per_s") != 0


def _axis(rows: int) -> str:
    """The layout key of the bottom x axis of a figure of `rows` panels one above another."""
    return f"xaxis{rows}" if rows > 1 else "xaxis"


def _loss_at(c: Curve, step: int) -> float | None:
    losses = [r["loss"] for r in c.train if r["step"] <= step and isinstance(r.get("loss"), (int, float))]
    return losses[-1] if losses else next((r["loss"] for r in c.train if isinstance(r.get("loss"), (int, float))),
                                          None)


def _color(k: int) -> str:
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")
    return palette[k % len(palette)]


# ----------------------------------------------------------------- the tables


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """An HTML table; every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(report.number(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def metrics_tables(data: dict[str, Any]) -> str:
    """The shared evals side by side, then each stage's own final metrics."""
    columns, rows = report.shared_columns(report.shared(data))
    out = _table(["stage", *columns], [[n, *(m.get(c, "-") for c in columns)] for n, m in rows], "shared") \
        if columns else "<p>No shared eval sets in this run.</p>"
    shared = set(data.get("evals") or [])
    own = {n: {k: v for k, v in (e.get("metrics") or {}).items() if k.split("/")[0] not in shared}
           for n, e in data["stages"].items()}
    names = list(dict.fromkeys(k for m in own.values() for k in m))
    return out + "<h3>Each stage's final metrics</h3>" + _table(
        ["stage", "kind", "state", "steps", *names],
        [[n, e.get("kind", "?"), e.get("state", "?"), e.get("steps", "-"), *(own[n].get(k, "-") for k in names)]
         for n, e in data["stages"].items()], "metrics")


def summary_html(data: dict[str, Any]) -> str:
    """The page's opening: the run's outcome, each stage's key metric and what it bought against the stage it came
    from, and the decisions taken (the pictures follow)."""
    rows = [[r.stage, r.kind, r.state, r.metric or "-", "-" if r.value is None else r.value, summary.change_text(r)]
            for r in summary.rows(data)]
    return (f'<p class="outcome"><b>Outcome</b>: {html.escape(summary.outcome(data))}</p>'
            + _table(["stage", "kind", "state", "key metric", "value", "what it bought"], rows, "summary")
            + "<h3>Decisions</h3>" + decisions_list(data))


def attempts_table(data: dict[str, Any]) -> str:
    rows = []
    for name, e in data["stages"].items():
        for a in e.get("attempts") or []:
            backend = a.get("backend", "?") + (f" job {a['job_id']}" if a.get("job_id") else "")
            outcome = a.get("outcome", "-") + ("; previous output kept" if a.get("kept_previous") else "") \
                + (f": {a['error']}" if a.get("error") else "")
            wall = f"{a['wall_s']:.1f} s" if isinstance(a.get("wall_s"), (int, float)) else "-"
            rows.append([name, a.get("attempt", "?"), backend, _time(a.get("started")), _time(a.get("ended")), wall,
                         exit_text(a), outcome, a.get("resumed_from") or "-", a.get("host", "-")])
    header = ["stage", "attempt", "backend", "started", "ended", "wall time", "exit", "outcome", "resumed from", "host"]
    return _table(header, rows, "attempts")


def exit_text(attempt: dict[str, Any]) -> str:
    """The attempt's exit code as the terminal said it: a stop asked for is 75 whatever torchrun exited with (its
    own code beside it). Ledgers from before the driver said so hold torchrun's code for a preempted attempt."""
    code = attempt.get("exit_code", "-")
    launcher = attempt.get("launcher_exit_code")
    if launcher is None and attempt.get("outcome") == "preempted" and code not in (EXIT_STOPPED, "-"):
        launcher, code = code, EXIT_STOPPED
    return f"{code} (torchrun: {launcher})" if launcher is not None else str(code)


def decisions_list(data: dict[str, Any]) -> str:
    """Each decision taken, as `baton status` words it."""
    items = [f"<li><b>{html.escape(name)}</b>: {html.escape(line)}</li>"
             for name, line in report.decision_lines(report.decided(data))]
    return f"<ul>{''.join(items)}</ul>" if items else "<p>No gates or variants in this run.</p>"


def settings_html(run_dir: Path, data: dict[str, Any]) -> str:
    found = manifest_text(run_dir, data)
    out = (f"<details open><summary>manifest: {html.escape(found[0])} {html.escape(short(data.get('manifest_digest')))}"
           f"</summary><pre>{html.escape(found[1])}</pre></details>") if found else "<p>The manifest is gone.</p>"
    for name, e in data["stages"].items():
        shown = {"settings": e.get("settings"), "inputs": e.get("inputs"), "output": e.get("output")}
        out += (f"<details><summary>{html.escape(name)} ({html.escape(str(e.get('kind', '?')))}) "
                f"fingerprint {html.escape(short(e.get('fingerprint')))}</summary>"
                f"<pre>{html.escape(json.dumps(shown, indent=2))}</pre></details>")
    return out


def _time(iso: Any) -> str:
    return iso.replace("T", " ")[:19] if isinstance(iso, str) else "-"


# ----------------------------------------------------------------- the page


PAGE = string.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>baton report: $run</title>
<link rel="icon" href="data:,">
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: 85%; }
#lineage svg { max-width: 100%; height: auto; } summary { cursor: pointer; }
.meta { color: #555; } .wide { overflow-x: auto; }
</style>
<script type="text/javascript">$plotlyjs</script>
</head><body>
<h1>Run $run</h1>
<p class="meta">$meta</p>
<section id="summary"><h2>Summary</h2>$summary</section>
<section id="lineage"><h2>Lineage</h2>$lineage</section>
<section id="curves"><h2>Training curves</h2>$training</section>
<section id="evals"><h2>Evaluations</h2>$evals</section>
<section id="metrics"><h2>What each stage bought</h2>$shared_plot$metrics</section>
<section id="attempts"><h2>Attempts and resumes</h2>$attempts</section>
<section id="settings"><h2>Settings</h2>$settings</section>
</body></html>
""")


def build(run_dir: Path) -> str:
    """The page's text."""
    import plotly
    import plotly.offline

    data = lineage.load(run_dir)
    cs = curves(run_dir, data)
    columns, rows = report.shared_columns(report.shared(data))

    def div(fig: Any | None, empty: str) -> str:
        config = {"displaylogo": False, "responsive": True}
        if fig is None:
            return f"<p>{empty}</p>" if empty else ""
        return fig.to_html(full_html=False, include_plotlyjs=False, config=config)

    meta = (f"{html.escape(str(run_dir))} · {len(data['stages'])} stage(s) · created {_time(data.get('created'))}"
            f" · updated {_time(data.get('updated'))} · report made {_time(dt.datetime.now().isoformat())}"
            f" with plotly {plotly.__version__}")
    return PAGE.substitute(
        run=html.escape(str(data.get("run", run_dir.name))), meta=meta, plotlyjs=plotly.offline.get_plotlyjs(),
        lineage=lineage.svg(run_dir),
        training=div(training_figure(cs) if any(c.train for c in cs) else None, "No stage recorded training steps.")
        + "<p>Stages without training steps: " + (", ".join(html.escape(c.stage) for c in cs if not c.train) or "none")
        + ".</p>",
        evals=div(eval_figure(cs), "No eval records."),
        shared_plot=div(shared_figure(columns, rows, list(data["stages"])), ""),
        metrics=metrics_tables(data), attempts=attempts_table(data), summary=summary_html(data),
        settings=settings_html(run_dir, data))
