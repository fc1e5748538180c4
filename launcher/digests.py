"""Digests of the files and folders a run reads and hands on, each computed once per state of its files.

A plan is made twice (before the run lock and under it), and several stages may read one data file or name
one model folder: keyed by the files' sizes and modification times, a digest is computed once per process,
and an edit is still seen."""

from __future__ import annotations

import json
from pathlib import Path

from contract.files import dir_digest, file_digest


def folder_stat(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every file below `folder`: the cheap sign that nothing changed.

    Recorded beside a stage's output digest when it finishes; while it matches, the digest is trusted."""
    out: dict[str, list[int]] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def folder_digest(folder: Path, stat: dict[str, list[int]] | None = None) -> str:
    """`dir_digest(folder)`, once per `folder_stat` (`stat`, when the caller has just taken it)."""
    key = (str(folder), json.dumps(folder_stat(folder) if stat is None else stat, sort_keys=True))
    if key not in _FOLDERS:
        _FOLDERS[key] = dir_digest(folder)
    return _FOLDERS[key]


def known_intact(folder: Path, digest: str) -> dict[str, list[int]] | None:
    """The folder's stat if this process hashed it, as it is now, and found `digest`: a stat record to keep
    so that the next plan need not hash it again. Never hashes."""
    if not folder.is_dir():
        return None
    now = folder_stat(folder)
    return now if _FOLDERS.get((str(folder), json.dumps(now, sort_keys=True))) == digest else None


def data_file_digest(path: str) -> str:
    """`file_digest(path)`, once per size and modification time."""
    st = Path(path).stat()
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _FILES:
        _FILES[key] = file_digest(Path(path))
    return _FILES[key]


_FOLDERS: dict[tuple[str, str], str] = {}
_FILES: dict[tuple[str, int, int], str] = {}
