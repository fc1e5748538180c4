"""The run's record: `<run>/ledger.json`, written by one driver at a time.

Plain JSON on purpose (run folders live on NFS/Lustre, where embedded databases'
file locks misbehave). Every write goes to a temp file, is fsynced and renamed
over the old ledger, so a crash leaves the previous or the new ledger, never half
of one. A lock file created with O_EXCL keeps a second driver out; a lock left by
a dead process on this host is taken over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from contract.files import write_atomic
from launcher.errors import LedgerError

LEDGER = "ledger.json"
LOCK = ".baton.lock"
VERSION = 1

# A stage's state; only `set_state` writes it.
State = Literal["pending", "queued", "running", "requeued", "preempted", "done", "failed", "cancelled"]
ACTIVE: tuple[State, ...] = ("queued", "running", "requeued")  # a Slurm job of the stage is live


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def read(run_dir: Path) -> dict[str, Any]:
    """The ledger as it is on disk (no lock; for status, lineage and dry runs)."""
    path = run_dir / LEDGER
    if not path.exists():
        return {"version": VERSION, "stages": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LedgerError(f"{path}: unreadable ledger: {e}") from None
    if data.get("version") != VERSION:
        raise LedgerError(f"{path}: ledger version {data.get('version')!r}; this baton reads version {VERSION}")
    return data


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
        assert self._locked, "the ledger is written only under its lock"
        self.data["updated"] = now()
        write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=False) + "\n")


def set_state(entry: dict[str, Any], state: State, **fields: Any) -> None:
    """Change a stage entry's state (and any other fields with it)."""
    entry.update(fields, state=state)


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
