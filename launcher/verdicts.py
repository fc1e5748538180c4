"""Checks that passed, remembered: one small JSON file per check under ~/.cache/baton/<folder> (or
$BATON_CACHE_DIR/<folder>), named by what was checked and by what judged it (library versions, the checking
module's own digest). An unchanged manifest is then not judged again, and its libraries (transformers, deepspeed:
seconds to import) are not imported. Failures are never remembered."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from contract.files import write_atomic


def remembered(folder: str, what: str, key: Any, judges: Sequence[str], check: Callable[[], tuple[Any, Any]]
               ) -> tuple[Any, Any]:
    """`check()` → (what it found, JSON; problems), unless a check of `what` on the same `key` by the same `judges`
    passed before: then what it found (a JSON list comes back as a tuple) and no problems. Without a usable cache
    (a key that is not JSON, no home folder) it just checks."""
    try:
        blob = json.dumps([what, key, list(judges)], sort_keys=True)
        path: Path | None = cache_dir(folder) / f"{hashlib.sha256(blob.encode()).hexdigest()}.json"
    except Exception:  # TypeError: not JSON; RuntimeError: no home
        path = None
    if path is not None:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))["found"]
            return (tuple(found) if isinstance(found, list) else found), ()
        except (OSError, ValueError, KeyError, TypeError):
            pass
    found, problems = check()
    if path is not None and not problems:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"found": list(found) if isinstance(found, tuple) else found}) + "\n")
        except (OSError, TypeError, ValueError):
            pass
    return found, problems


def cache_dir(folder: str) -> Path:
    """$BATON_CACHE_DIR/<folder>, else baton/<folder> in the user's cache folder (~/.cache)."""
    own = os.environ.get("BATON_CACHE_DIR")
    root = Path(own) if own else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "baton"
    return root / folder


@functools.cache
def judges(module_file: str, *packages: str) -> tuple[str, ...]:
    """What a verdict depends on besides its input: the packages' versions and the checking module's digest."""
    versions = [f"{n} {importlib.metadata.version(n)}" for n in packages]
    return (*versions, hashlib.sha256(Path(module_file).read_bytes()).hexdigest())
