"""Files the launcher and the stages both read and write: content digests ("sha256:<hex>"),
checkpoint checksums ("crc32:<hex>") and atomic writes.

Standard library only: the launcher never imports torch, and a digest written by
one side is checked by the other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of one file's bytes."""
    return "sha256:" + _file_hex(Path(path))


def file_checksum(path: str | os.PathLike[str]) -> str:
    """CRC-32 of one file's bytes ("crc32:<hex>"): what a checkpoint records to find a file damaged or cut short.
    About 4× faster than sha256 here; a checkpoint needs no collision resistance (lineage digests keep sha256)."""
    crc = 0
    for chunk in _chunks(Path(path)):
        crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def content_matches(path: str | os.PathLike[str], recorded: str) -> bool:
    """Whether the file at `path` has the content `recorded`: a `file_checksum`, or a `file_digest` (checkpoints
    saved before checksums)."""
    return (file_checksum(path) if recorded.startswith("crc32:") else file_digest(path)) == recorded


def dir_digest(path: str | os.PathLike[str]) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of every file below `path`.

    Names and contents count, timestamps and permissions do not, so a copied or
    re-downloaded folder keeps its digest.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    h = hashlib.sha256()
    for rel in sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()):
        h.update(f"{rel}\0{_file_hex(root / rel)}\n".encode())
    return "sha256:" + h.hexdigest()


def digest(path: str | os.PathLike[str]) -> str:
    """`dir_digest` for a folder, `file_digest` for a file."""
    return dir_digest(path) if Path(path).is_dir() else file_digest(path)


def short(digest: str | None) -> str:
    """The first 12 hex digits of a digest, for people; "-" for none."""
    return digest.split(":", 1)[-1][:12] if digest else "-"


def _file_hex(path: Path) -> str:
    h = hashlib.sha256()
    for chunk in _chunks(path):
        h.update(chunk)
    return h.hexdigest()


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write so that readers see the old or the new file, never a part: temp file, fsync, rename, fsync the folder.
    Text is written as UTF-8."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Strict JSON: a NaN or infinity here is a bug (see `json_safe`), not a literal other parsers refuse."""
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN and infinity replaced by null, so records of a diverging run stay strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
