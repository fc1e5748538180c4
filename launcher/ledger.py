"""The run's record: `<run>/ledger.json`, written by one driver at a time.

Plain JSON on purpose (run folders live on NFS/Lustre, where embedded databases'
file locks misbehave). Every write goes to a temp file, is fsynced and renamed
over the old ledger, so a crash leaves the previous or the new ledger, never half
of one. A lock file created with O_EXCL keeps a second driver out; a lock left by
a dead process on this host is taken over.

Each save keeps the ledger it replaces as `ledger.json.1` (renamed into place, so it too is whole or absent):
when the ledger is found unreadable, `baton restore-ledger` puts that generation back. No command writes its
output over a file baton keeps in a run folder (`owner`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import shutil
import socket
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from contract.files import write_atomic
from launcher.errors import LedgerError

LEDGER = "ledger.json"
PREVIOUS = f"{LEDGER}.1"  # the generation before the newest save
DAMAGED = f"{LEDGER}.damaged"  # an unreadable ledger that `restore` replaced, kept for inspection
LOCK = ".baton.lock"
# what baton keeps at the top of a run folder (a stage's folder under stages/ is the stage's, all of it)
KEPT = (LEDGER, PREVIOUS, DAMAGED, LOCK, "manifest.yaml", "stages", "cache")
VERSION = 1

# A stage's state; only `set_state` writes it.
State = Literal["pending", "queued", "running", "requeued", "preempted", "done", "failed", "cancelled",
                "skipped",  # a Slurm job whose stage a decision made unneeded (or a gate stop before it)
                "damaged"]  # was done, but its final/ no longer holds the recorded digest: the next run reruns it
ACTIVE: tuple[State, ...] = ("queued", "running", "requeued")  # a Slurm job of the stage is live


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def read(run_dir: Path) -> dict[str, Any]:
    """The ledger as it is on disk (no lock; for status, lineage and dry runs); checked, not trusted."""
    for existing in (run_dir, *run_dir.parents):
        if existing.exists():
            if not existing.is_dir():
                raise LedgerError(f"{run_dir}: not a run folder: {existing} is a file")
            break
    path = run_dir / LEDGER
    if not path.exists():
        return {"version": VERSION, "stages": {}}
    try:
        data = _parse(path)
    except LedgerError as e:
        raise LedgerError(f"{e}{_offer(run_dir)}") from None
    if isinstance(data, dict) and "version" in data and data["version"] != VERSION:
        raise LedgerError(f"{path}: ledger version {data['version']!r}; this baton reads version {VERSION}")
    problem = _problem(data)
    if problem:
        raise LedgerError(f"{path}: not a baton ledger: {problem}; move it away to start the run afresh"
                          + _offer(run_dir))
    return data


def _parse(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LedgerError(f"{path}: unreadable ledger: not UTF-8 text (byte {e.start})") from None
    except (OSError, ValueError, RecursionError) as e:
        raise LedgerError(f"{path}: unreadable ledger: {' '.join(str(e).split())[:200]}") from None


def _previous(run_dir: Path) -> dict[str, Any] | None:
    """The previous generation (ledger.json.1) if it is a ledger this baton reads."""
    try:
        data = _parse(run_dir / PREVIOUS)
    except LedgerError:
        return None
    return data if _problem(data) is None else None


def _offer(run_dir: Path) -> str:
    previous = _previous(run_dir)
    if previous is None:
        return ""
    return (f"; its previous generation {PREVIOUS} (saved {previous.get('updated', '?')}) is readable: "
            f"`baton restore-ledger {run_dir}` puts it back")


def restore(run_dir: Path) -> str:
    """`baton restore-ledger`: replace an unreadable ledger with its previous generation (the unreadable one is
    kept as ledger.json.damaged). Refused while the ledger reads, or without a readable generation."""
    path = run_dir / LEDGER
    lock = run_dir / LOCK
    _acquire(lock)
    try:
        try:
            readable = path.exists() and bool(read(run_dir))
        except LedgerError:
            readable = False
        if readable:
            raise LedgerError(f"{path}: the ledger is readable; nothing to restore")
        previous = _previous(run_dir)
        if previous is None:
            raise LedgerError(f"{run_dir}: no readable {PREVIOUS} to restore the ledger from")
        if path.exists():
            os.replace(path, run_dir / DAMAGED)
        write_atomic(path, (run_dir / PREVIOUS).read_bytes())
    finally:
        lock.unlink(missing_ok=True)
    return (f"{path}: restored from {PREVIOUS} (saved {previous.get('updated', '?')})"
            + (f"; the unreadable one is {run_dir / DAMAGED}" if (run_dir / DAMAGED).exists() else ""))


def owner(path: Path) -> str | None:
    """Why no command may write its output (-o) to `path`: it is a file baton keeps in a run folder (the ledger
    and its generations, the manifest's copy, anything of a stage: spec, results, metrics, evals, final/,
    ckpt/). None where `path` is free. Judged by where a rename onto `path` would land: its folder's links are
    followed, the name itself is not."""
    try:
        target = path.parent.resolve() / path.name
    except (OSError, RuntimeError):
        return None
    for folder in target.parents:
        if any((folder / marker).is_file() for marker in (LEDGER, PREVIOUS, LOCK)):
            rel = target.relative_to(folder)
            if rel.parts[0] in KEPT or rel.parts[0].startswith(f".{LEDGER}"):
                return f"{rel.as_posix()} is a file baton keeps in the run folder {folder}"
            return None
    return None


_STATES = frozenset(typing.get_args(State))
_SHAPES: dict[str, type | tuple[type, ...]] = {  # a stage entry's fields that baton reads, and their JSON types
    "state": str, "attempts": list, "fingerprint": (str, type(None)), "settings": (dict, type(None)),
    "output": (dict, type(None)), "slurm": (dict, type(None)),
}


def _problem(data: Any) -> str | None:
    """What makes `data` no ledger baton can plan from, or None."""
    if not isinstance(data, dict):
        return f"a JSON object is expected, got {type(data).__name__ if data is not None else 'null'}"
    if data.get("version") != VERSION:
        return f"version: {data.get('version')!r:.60}, expected {VERSION}"
    stages = data.get("stages")
    if not isinstance(stages, dict):
        got = "missing" if stages is None else f"a JSON object is expected, not {type(stages).__name__}"
        return f"stages: {got}"
    if not isinstance(data.get("manifest", ""), str):
        return "manifest: a path string is expected"
    for name, entry in stages.items():
        if not isinstance(entry, dict):
            return f"stages.{name}: a JSON object is expected, got {type(entry).__name__}"
        for key, kind in _SHAPES.items():
            if (key in entry or key in ("state", "attempts")) and not isinstance(entry.get(key), kind):
                return f"stages.{name}.{key}: {entry.get(key)!r:.60} is not of the expected type"
        if entry["state"] not in _STATES:
            return f"stages.{name}.state: {entry['state']!r:.60} is not one of {', '.join(sorted(_STATES))}"
        if not all(isinstance(a, dict) for a in entry["attempts"]):
            return f"stages.{name}.attempts: a list of JSON objects is expected"
        output = entry.get("output")
        if output is not None and not isinstance(output.get("digest"), str):
            return f"stages.{name}.output.digest: missing or not a string"
        slurm = entry.get("slurm")
        if slurm is not None and not isinstance(slurm.get("job_id"), (str, int)):
            return f"stages.{name}.slurm.job_id: missing"
    return None


class Ledger:
    """The ledger of one run folder, held under its lock. Use as a context manager."""

    def __init__(self, run_dir: Path, wait_s: float = 0):
        self.run_dir = run_dir
        self.path = run_dir / LEDGER
        self.data: dict[str, Any] = {}
        self.wait_s = wait_s  # how long to wait for another holder (jobs updating the ledger take turns)
        self._locked = False

    def __enter__(self) -> Ledger:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _acquire(self.run_dir / LOCK, self.wait_s)
        self._locked = True
        try:
            self.data = read(self.run_dir)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._locked:
            (self.run_dir / LOCK).unlink(missing_ok=True)
            self._locked = False

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"state": "pending", "attempts": []})

    @contextlib.contextmanager
    def edit(self) -> Iterator[Ledger]:
        """Change the ledger and save it: under the lock this object holds (a driver), or else taking
        the lock just for the change and reading the ledger afresh (a Slurm job, between long waits)."""
        if self._locked:
            yield self
            self.save()
            return
        with self:
            yield self
            self.save()

    def save(self) -> None:
        """Write the ledger (and keep the one it replaces). A full disk is a LedgerError, never a traceback: the
        ledger on disk is then the whole one from before this change."""
        assert self._locked, "the ledger is written only under its lock"
        self.data["updated"] = now()
        text = json.dumps(self.data, indent=2, sort_keys=False) + "\n"
        try:
            _keep_previous(self.path)
            write_atomic(self.path, text)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise LedgerError(f"{self.path}: no space left on device to save the ledger; it still holds the run "
                              "as it was before this change; free space and run `baton run` again") from None


def _keep_previous(path: Path) -> None:
    """Keep the ledger about to be replaced as ledger.json.1: a second name for the same file, renamed into
    place (a copy where the file system has no hard links). A ledger that does not read is not kept: the
    generation stays one that can be restored."""
    try:
        if _problem(_parse(path)) is not None:
            return
    except LedgerError:
        return
    tmp = path.with_name(f".{PREVIOUS}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, path.with_name(PREVIOUS))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def set_state(entry: dict[str, Any], state: State, **fields: Any) -> None:
    """Change a stage entry's state (and any other fields with it)."""
    entry.update(fields, state=state)


def mark_damaged(entry: dict[str, Any], why: str) -> bool:
    """Record that a done stage's final/ no longer holds its recorded digest (`why`): state damaged, the output's
    record kept for the lineage. False when the entry is not a done stage's (nothing to mark, or marked)."""
    if entry.get("state") != "done":
        return False
    set_state(entry, "damaged", damage=why)
    return True


def _acquire(lock: Path, wait_s: float = 0) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
    deadline = time.monotonic() + wait_s
    takeovers = 0
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            dead_here = holder.get("host") == me["host"] and not _alive(holder.get("pid"))
            torn = not holder and time.time() - lock.stat().st_mtime > 10  # creator died before writing it
            if (dead_here or torn) and takeovers < 2:
                lock.unlink(missing_ok=True)  # left by a driver that died on this host
                takeovers += 1
                continue
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise LedgerError(
                f"{lock.parent}: another baton driver holds this run (pid {holder.get('pid')} on "
                f"{holder.get('host')} since {holder.get('since')}); if it is gone, delete {lock}"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return


def held(run_dir: Path) -> bool:
    """Whether a driver holds the run now (its lock exists and, on this host, its process lives): else a stage
    the ledger says is running was left so by a driver that died (status shows it interrupted)."""
    lock = run_dir / LOCK
    if not lock.exists():
        return False
    holder = _holder(lock)
    return holder.get("host") != socket.gethostname() or _alive(holder.get("pid"))


def shown_state(entry: dict[str, Any], driver_alive: bool) -> str:
    """A stage's state as the views show it: a local stage running without a live driver is interrupted (the next
    `baton run` resumes it); Slurm stages have their jobs for a driver."""
    state = str(entry.get("state", "?"))
    return "interrupted" if state == "running" and not driver_alive and not entry.get("slurm") else state


def _holder(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
