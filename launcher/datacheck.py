"""A look at the first rows of each local data file before anything launches (standard library only).

What a stage would otherwise meet minutes later as a crash inside `datasets` or the tokenizer: a file
that is empty, not UTF-8 or not JSON lines, a text column that is missing, null or a number (a column of
conversations, lists of {role, content}, counts as text), files
of one stage whose columns differ; for a classifier's data, a label that is missing, null, neither a
string nor an integer, of another type than the others, outside the declared `data.labels`, or (eval)
one the training data never has. Only the first SAMPLE_ROWS rows (within SAMPLE_BYTES) are read,
so `baton run` on a large corpus stays quick; the stage still checks the rest (the eval labels against
the training labels only where the sample held every training row). Parquet files and JSON files
holding one array are left to the stage.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

SAMPLE_ROWS = 100
SAMPLE_BYTES = 1 << 20


@dataclass(frozen=True)
class Labels:
    """What a classifier's data section says of its labels: the column, the declared names (data.labels), and
    where rows without labels can go instead (the stage kind's `unlabelled_rows`), said with a missing label."""

    field: str
    declared: list[str] | None = None
    elsewhere: str | None = None

    def missing(self, problem: str) -> str:
        """The message for a row without a label."""
        return f"{problem}; {self.elsewhere}" if self.elsewhere else problem


@dataclass
class _Seen:
    """The labels of a file's sampled rows: (line, value) each, and whether the sample held every row."""

    rows: list[tuple[int, str | int]] = dataclasses.field(default_factory=list)
    whole: bool = True


def check(files: dict[str, list[str]], fmt: str, fields: list[str], numbers: list[str] | None = None,
          labels: Labels | None = None) -> list[tuple[str, str]]:
    """[(split, problem)] for a stage's files {split: [paths]} of format `fmt` whose rows need `fields` (text),
    in the train split `numbers` (a curriculum's difficulty column: finite numbers), and `labels` (a classifier's
    data: a string or integer label in every row)."""
    problems: list[tuple[str, str]] = []
    columns: dict[str, tuple[str, ...]] = {}  # path -> columns, for files that have them
    seen: dict[str, dict[str, _Seen]] = {}  # split -> path -> labels
    for split, paths in files.items():
        for path in paths:
            found_labels = _Seen()
            try:
                found = _sample(Path(path), fmt, fields, (numbers or []) if split == "train" else [],
                                labels, found_labels)
            except ValueError as e:
                problems.append((split, f"{path}: {e}"))
                continue
            if found is not None:
                columns[path] = found
            if labels is not None and found is not None:
                seen.setdefault(split, {})[path] = found_labels
    if labels is not None and not problems:
        problems += _label_problems(seen, labels)
    if len(set(columns.values())) > 1:
        shown = "; ".join(f"{Path(p).name}: {', '.join(c)}" for p, c in columns.items())
        split = next(s for s, paths in files.items() if paths)
        problems.append((split, f"the stage's data files have different columns ({shown}); "
                                "datasets needs the same columns in every file"))
    return problems


def _label_problems(seen: dict[str, dict[str, _Seen]], labels: Labels) -> list[tuple[str, str]]:
    """One type in the whole label column; every label declared (data.labels); and each eval label one the
    training data has, where the sample held all of it."""
    rows = [(split, path, line, value) for split, files in seen.items() for path, s in files.items()
            for line, value in s.rows]
    if not rows:
        return []
    first = rows[0]
    for split, path, line, value in rows:
        if isinstance(value, str) != isinstance(first[3], str):
            what = ("a string" if isinstance(first[3], str) else "a number", "a number" if isinstance(value, int)
                    else "a string")
            return [(split, f"{path}: line {line}: label is {json.dumps(value)}, {what[1]}, where "
                            f"{Path(first[1]).name} line {first[2]}'s is {what[0]} {json.dumps(first[3])}; "
                            "one label column holds one type")]
    if labels.declared is not None:
        names = [str(n) for n in labels.declared]
        for split, path, line, value in rows:
            if str(value) not in names:
                return [(split, f"{path}: line {line}: label {str(value)!r} is not one of data.labels: "
                                f"{', '.join(names)}")]
        return []
    train = seen.get("train") or {}
    if not train or not all(s.whole for s in train.values()):
        return []  # the stage checks the eval labels against all the training rows
    known = sorted({str(v) for s in train.values() for _, v in s.rows})
    for split, path, line, value in rows:
        if split == "eval" and str(value) not in known:
            return [(split, f"{path}: line {line}: label {str(value)!r} never occurs in the training data "
                            f"(its labels: {', '.join(known)})")]
    return []


def _sample(path: Path, fmt: str, fields: list[str], numbers: list[str], labels: Labels | None = None,
            seen: _Seen | None = None) -> tuple[str, ...] | None:
    """The file's columns (None where they are not checked here); ValueError says what is wrong. With `labels`,
    each sampled row's label is checked and added to `seen`."""
    seen = seen if seen is not None else _Seen()
    text, seen.whole = _head(path)
    if not text.strip():
        raise ValueError("empty; the stage would have nothing to read")
    if fmt == "text":
        if labels is not None:
            raise ValueError(labels.missing(f"a text file has no column {labels.field!r}: every row of a "
                                            "classifier's data needs a label"))
        if numbers:
            raise ValueError(f"a text file has one column, text: no column {numbers[0]!r} for "
                             "curriculum.difficulty.column")
        return None
    if fmt == "json":
        return _json_lines(text, fields, numbers, labels, seen)
    if fmt == "csv":
        return _csv(text, fields, numbers, labels, seen)
    return None  # parquet: binary, read by the stage


def _head(path: Path) -> tuple[str, bool]:
    """The file's first SAMPLE_BYTES as whole lines of text, and whether that is the whole file."""
    with path.open("rb") as f:
        raw = f.read(SAMPLE_BYTES)
    whole = len(raw) < SAMPLE_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(raw, final=whole)  # a character cut at the end of a sample is not an error
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    return (text, True) if whole else (text[: text.rfind("\n") + 1], False)  # whole lines only


def _json_lines(text: str, fields: list[str], numbers: list[str], labels: Labels | None,
                seen: _Seen) -> tuple[str, ...] | None:
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
        for column in numbers:
            _number(row.get(column, _MISSING), column, f"line {n}", ", ".join(row))
        if labels is not None:
            seen.rows.append((n, _label(row.get(labels.field, _MISSING), labels, f"line {n}", ", ".join(row))))
        first = first or tuple(sorted(row))
        rows += 1
        if rows >= SAMPLE_ROWS:
            seen.whole = seen.whole and not any(rest.strip() for rest in text.splitlines()[n:])
            break
    return first


def _csv(text: str, fields: list[str], numbers: list[str], labels: Labels | None, seen: _Seen) -> tuple[str, ...]:
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(reader.fieldnames or ())
    missing = [f for f in fields + numbers if f not in header]
    if missing:
        raise ValueError(f"line 1: no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})")
    if labels is not None and labels.field not in header:
        raise ValueError(labels.missing(f"line 1: no column {labels.field!r} (columns: {', '.join(header)}); set "
                                        "data.label_field"))
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
        if labels is not None:
            cell = row.get(labels.field)
            if not cell:  # datasets reads an empty cell as null
                raise ValueError(labels.missing(f"line {n}: {labels.field} is empty (datasets reads it as null: "
                                                "no label)"))
            # datasets reads a column of whole numbers as integers
            seen.rows.append((n, int(cell) if cell.lstrip("-").isdigit() else cell))
        if n > SAMPLE_ROWS:
            seen.whole = False
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


def _label(value: object, labels: Labels, where: str, columns: str) -> str | int:
    """A classifier's label: a string or an integer (`datasets` and the stage read no other)."""
    field = labels.field
    if value is _MISSING:
        raise ValueError(labels.missing(f"{where}: no field {field!r} (fields: {columns or 'none'}); set "
                                        "data.label_field"))
    if value is None:
        raise ValueError(labels.missing(f"{where}: {field} is null; every row needs a label"))
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: {field} is {json.dumps(value)}, not a string or an integer")
    return value


def _number(value: object, field: str, where: str, columns: str) -> None:
    """A curriculum's difficulty value: a finite number."""
    if value is _MISSING:
        raise ValueError(f"{where}: no field {field!r} for curriculum.difficulty.column (fields: {columns or 'none'})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {field} is {json.dumps(value)}, not a finite number "
                         "(curriculum.difficulty.column)")
