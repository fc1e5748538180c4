"""What `baton run` shows while a stage runs.

The ranks' output goes to the stage's logs only (torchrun `--redirects 3`). While the
stage runs, a thread of the driver reads two things the stage writes: rank 0's stdout
log (the stage's own lines: what it loads, resumes, warns about) and metrics.jsonl
(steps, loss, speed, evals). On a terminal it shows a live view: the pipeline's
stages and, for the running one, a progress bar with step, loss, tokens/s, ETA and
the last eval, with the stage's other lines printed above it. Elsewhere (Slurm job
logs, CI, a pipe) it prints rank 0's lines as they come, each with the time and the
stage's name.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from launcher.progress import Progress, Tail

POLL_S = 0.5
# rank 0's lines that the live view shows in its bar instead (stages/runtime/speed.py and loop.py write them)
IN_THE_BAR = re.compile(r"^(step \d+/\d+ |eval )")
MARKS = {"done": ("✓", "green"), "running": ("▶", "bold cyan"), "failed": ("✗", "red"), "preempted": ("⏸", "yellow"),
         "cancelled": ("✗", "yellow"), "skipped": ("-", "dim")}


class Watch:
    """A context manager around a stage's launch. `overview`: (stage, kind, state) of the plan's stages in order,
    the running one among them; None shows the running stage alone."""

    def __init__(self, name: str, kind: str, folder: Path, log_dir: Path, launched: str,
                 overview: list[tuple[str, str, str]] | None = None, console: Any = None) -> None:
        from rich.console import Console

        self.name, self.kind, self.log_dir = name, kind, log_dir
        self.progress = Progress(folder, launched)
        self.overview = overview or [(name, kind, "running")]
        self.console = console or Console()
        self.live = self.console.is_terminal
        self._tails: dict[Path, Tail] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baton-watch", daemon=True)
        self._view: Any = None

    def __enter__(self) -> Watch:
        if self.live:
            from rich.live import Live

            self._view = Live(get_renderable=self.render, console=self.console, refresh_per_second=4,
                              transient=True, redirect_stdout=True, redirect_stderr=True)
            self._view.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # what the stage wrote last
        if self._view is not None:
            self._view.stop()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        self.progress.update()
        for line in self._new_lines():
            if not self.live:
                print(f"{time.strftime('%H:%M:%S')} {self.name} | {line}", flush=True)
            elif not IN_THE_BAR.match(line):
                self.console.print(f"[dim]{self.name} |[/dim] {line}", markup=True, highlight=False,
                                   soft_wrap=True)

    def _new_lines(self) -> list[str]:
        """Rank 0's new stdout lines. torchrun writes `<log_dir>/<run id>/attempt_<n>/<local rank>/stdout.log`;
        only the global rank 0 prints, so every node's local rank 0 is read (one per node under Slurm)."""
        for path in sorted(self.log_dir.glob("*/attempt_*/0/stdout.log")):
            self._tails.setdefault(path, Tail(path))
        return [line.decode("utf-8", "replace").rstrip("\r") for tail in self._tails.values() for line in tail.lines()]

    def render(self) -> Any:
        """The live view: one row per stage of the plan, the running one with its bar and numbers."""
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table.grid(padding=(0, 1))
        p = self.progress
        for name, kind, state in self.overview:
            mark, style = MARKS.get(state, ("·", "dim"))
            if name != self.name:
                table.add_row(f"[{style}]{mark}[/]", name, f"[dim]{kind}[/]", f"[{style}]{state}[/]")
                continue
            bar = ProgressBar(total=float(p.max_steps or 1), completed=float(p.step or 0), width=30) \
                if p.max_steps else "starting" if p.step is None else "running"
            launched = p.launched_at
            elapsed = f"{_clock(time.time() - launched)}  " if launched is not None else ""
            table.add_row("[bold cyan]▶[/]", f"[bold]{name}[/]", f"[dim]{kind}[/]", bar, elapsed + describe(p))
        return table


def describe(p: Progress) -> str:
    """`step 240/1500  loss 3.2104  12,345 tokens/s  eta 3:12  eval_loss 4.1 (step 200)` with what is known."""
    parts = []
    if p.step is not None and p.max_steps:
        parts.append(f"step {p.step}/{p.max_steps}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.tokens_per_s:
        parts.append(f"{p.tokens_per_s:,.0f} tokens/s")
    if p.eta_s is not None:
        parts.append(f"eta {_clock(p.eta_s)}")
    if p.eval:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in list(p.eval.items())[:3] if isinstance(v, (int, float)))
        parts.append(f"{shown} (step {p.eval_step})")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    """3:07, or 1:02:07 from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"
