"""A look at the first rows of each local data file before anything launches (standard library only).

What a stage would otherwise meet minutes later as a crash inside `datasets` or the tokenizer: a file
that is empty, not UTF-8 or not JSON lines, a text column that is missing, null or a number (a column of
conversations, lists of {role, content}, counts as text), files
of one stage whose columns differ. Only the first SAMPLE_ROWS rows (within SAMPLE_BYTES) are read,
so `baton run` on a large corpus stays quick; the stage still checks the rest. Parquet files and
JSON files holding one array are left to the stage.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from pathlib import Path

SAMPLE_ROWS = 100
SAMPLE_BYTES = 1 << 20


def check(files: dict[str, list[str]], fmt: str, fields: list[str], numbers: list[str] | None = None,
          ) -> list[tuple[str, str]]:
    """[(split, problem)] for a stage's files {split: [paths]} of format `fmt` whose rows need `fields` (text)
    and, in the train split, `numbers` (a curriculum's difficulty column: finite numbers)."""
    problems: list[tuple[str, str]] = []
    columns: dict[str, tuple[str, ...]] = {}  # path -> columns, for files that have them
    for split, paths in files.items():
        for path in paths:
            try:
                found = _sample(Path(path), fmt, fields, (numbers or []) if split == "train" else [])
            except ValueError as e:
                problems.append((split, f"{path}: {e}"))
                continue
            if found is not None:
                columns[path] = found
    if len(set(columns.values())) > 1:
        shown = "; ".join(f"{Path(p).name}: {', '.join(c)}" for p, c in columns.items())
        split = next(s for s, paths in files.items() if paths)
        problems.append((split, f"the stage's data files have different columns ({shown}); "
                                "datasets needs the same columns in every file"))
    return problems


def _sample(path: Path, fmt: str, fields: list[str], numbers: list[str]) -> tuple[str, ...] | None:
    """The file's columns (None where they are not checked here); ValueError says what is wrong."""
    text = _head(path)
    if not text.strip():
        raise ValueError("empty; the stage would have nothing to read")
    if fmt == "text":
        if numbers:
            raise ValueError(f"a text file has one column, text: no column {numbers[0]!r} for "
                             "curriculum.difficulty.column")
        return None
    if fmt == "json":
        return _json_lines(text, fields, numbers)
    if fmt == "csv":
        return _csv(text, fields, numbers)
    return None  # parquet: binary, read by the stage


def _head(path: Path) -> str:
    with path.open("rb") as f:
        raw = f.read(SAMPLE_BYTES)
    whole = len(raw) < SAMPLE_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(raw, final=whole)  # a character cut at the end of a sample is not an error
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    return text if whole else text[: text.rfind("\n") + 1]  # whole lines only


def _json_lines(text: str, fields: list[str], numbers: list[str]) -> tuple[str, ...] | None:
    if text.lstrip()[:1] == "[":
        return None  # one JSON array: the stage reads it whole
    rows = 0
    first: tuple[str, ...] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {n}: not JSON ({e.msg}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"line {n}: a JSON {type(row).__name__}, expected an object per line")
        _fields(row, fields, f"line {n}")
        for field in numbers:
            _number(row.get(field, _MISSING), field, f"line {n}", ", ".join(row))
        first = first or tuple(sorted(row))
        rows += 1
        if rows >= SAMPLE_ROWS:
            break
    return first


def _csv(text: str, fields: list[str], numbers: list[str]) -> tuple[str, ...]:
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(reader.fieldnames or ())
    missing = [f for f in fields + numbers if f not in header]
    if missing:
        raise ValueError(f"line 1: no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})")
    for n, row in enumerate(reader, 2):
        for field in fields:
            if not row.get(field):  # datasets reads an empty cell as null
                raise ValueError(f"line {n}: {field} is empty (datasets reads it as null, which has no text)")
        for field in numbers:
            try:
                value: object = float(row.get(field) or "")
            except ValueError:
                value = row.get(field)
            _number(value, field, f"line {n}", ", ".join(header))
        if n > SAMPLE_ROWS:
            break
    return tuple(sorted(header))


def _fields(row: dict, fields: list[str], where: str) -> None:
    for field in fields:
        if field not in row:
            raise ValueError(f"{where}: no field {field!r} (fields: {', '.join(row) or 'none'}); "
                             "set data.text_field")
        if not isinstance(row[field], str) and not _conversation(row[field]):
            raise ValueError(f"{where}: {field} is {json.dumps(row[field])[:200]}, not a string nor a conversation "
                             "(a list of {role, content})")


def _conversation(value: object) -> bool:
    """A chat's turns, as a `messages` column holds them: a non-empty list of {role, content} with text."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in value)


_MISSING = object()


def _number(value: object, field: str, where: str, columns: str) -> None:
    """A curriculum's difficulty value: a finite number."""
    if value is _MISSING:
        raise ValueError(f"{where}: no field {field!r} for curriculum.difficulty.column (fields: {columns or 'none'})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {field} is {json.dumps(value)}, not a finite number "
                         "(curriculum.difficulty.column)")
