"""Safe YAML loading that remembers the line of every key, so errors can say `file:line key.path`.

Beyond PyYAML's safe schema, a manifest must be UTF-8 text without control characters, at most
MAX_BYTES long, nested at most MAX_DEPTH deep, and hold at most MAX_VALUES values once aliases are
expanded (an alias refers to its anchor's node, so a few lines of nested aliases can stand for
billions of values). Merge keys (`<<: *base`) work as YAML defines them: keys written in the
mapping win over merged ones, and an earlier mapping in `<<: [*a, *b]` wins over a later one.
"""

from __future__ import annotations

import datetime as dt
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import ConfigError

Path_ = tuple[str | int, ...]

MAX_BYTES = 1 << 20  # a manifest is a page or two; anything near this is not one
MAX_DEPTH = 64  # nested mappings and lists; deeper input is refused, not recursed into
MAX_VALUES = 100_000  # values built, aliases expanded
MERGE = "tag:yaml.org,2002:merge"
# C0 controls but tab, newline and carriage return; DEL; C1 controls but NEL (what PyYAML's reader refuses too)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x80-\x84\x86-\x9f\ufffe\uffff]")


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_DEPTH while composing (PyYAML recurses there)."""

    source = ""
    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.source}:{line} nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Builder:
    """Node graph -> plain data, recording the line of every key path and refusing duplicate keys."""

    def __init__(self, loader: _Loader, source: str) -> None:
        self.loader, self.source = loader, source
        self.lines: dict[Path_, int] = {}
        self.built = 0
        self.flattened: dict[int, dict[Any, tuple[yaml.Node, int]]] = {}  # by id(node): each mapping once

    def fail(self, line: int, path: Path_, message: str) -> ConfigError:
        return ConfigError(f"{self.source}:{line} {dotted(path) or '<top>'}: {message}")

    def count(self, n: int, line: int, path: Path_) -> None:
        self.built += n
        if self.built > MAX_VALUES:
            raise self.fail(line, path, f"more than {MAX_VALUES:,} values once YAML aliases and merge keys are "
                            "expanded; a manifest that large is refused (an alias bomb?)")

    def build(self, node: yaml.Node, path: Path_, depth: int = 0, at: int | None = None) -> Any:
        """`at`: the line every key below gets (the `<<` line, for what a merge brings in)."""
        line = at or node.start_mark.line + 1
        self.lines.setdefault(path, line)
        self.count(1, line, path)
        if depth > MAX_DEPTH:  # only a recursive alias gets here: composing stops at MAX_DEPTH
            raise self.fail(line, path, f"nested more than {MAX_DEPTH} levels deep (a recursive alias?)")
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key, (value_node, key_line) in self.pairs(node, path, set()).items():
                key_path: Path_ = (*path, key)
                self.lines[key_path] = at or key_line
                out[key] = self.build(value_node, key_path, depth + 1, at)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), depth + 1, at) for i, item in enumerate(node.value)]
        value = self.loader.construct_object(node)
        if isinstance(value, (dt.date, dt.datetime)):
            return node.value  # YAML 1.1 reads 2024-01-01 as a date; a manifest means the text
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise self.fail(line, path, f"unsupported YAML value ({type(value).__name__}); "
                            "use a string, number, boolean or null")
        return value

    def pairs(self, node: yaml.MappingNode, path: Path_, seen: set[int]) -> dict[Any, tuple[yaml.Node, int]]:
        """A mapping's keys -> (value node, line of the key), merge keys resolved."""
        if id(node) in self.flattened:
            return self.flattened[id(node)]
        if id(node) in seen or len(seen) > MAX_DEPTH:
            raise self.fail(node.start_mark.line + 1, path,
                            f"merge keys (<<) merge a mapping into itself or nest more than {MAX_DEPTH} deep")
        own: dict[Any, tuple[yaml.Node, int]] = {}
        merged: dict[Any, tuple[yaml.Node, int]] = {}
        merge_line = 0
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == MERGE:
                if merge_line:
                    raise self.fail(line, (*path, "<<"), f"duplicate key (first at line {merge_line})")
                merge_line = line
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, yaml.MappingNode):
                        raise self.fail(line, (*path, "<<"), "a merge key (<<) takes a mapping or a list of mappings")
                    brought = self.pairs(source, path, seen | {id(node)})
                    self.count(len(brought), line, path)
                    for key, (value, _) in brought.items():
                        merged.setdefault(key, (value, line))  # the first mapping named wins
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(line, path, "keys must be plain scalars")
            key = self.loader.construct_object(key_node)
            if not isinstance(key, (str, int)):
                raise self.fail(line, path, "keys must be plain scalars")
            if key in own:
                raise self.fail(line, (*path, key), f"duplicate key (first at line {own[key][1]})")
            own[key] = (value_node, line)
        out = {**{k: v for k, v in merged.items() if k not in own}, **own}
        self.flattened[id(node)] = out
        return out


def load_yaml(file: Path) -> tuple[Any, dict[Path_, int]]:
    """Parse `file` with YAML's safe schema; return (data, {key path: line})."""
    source = str(file)
    try:
        mode = file.stat().st_mode
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end; a folder is no manifest either
        what = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise ConfigError(f"{source}: not a regular file ({what}); a manifest is a YAML file")
    try:
        with file.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{source}:1 larger than {MAX_BYTES // (1 << 20)} MiB; that is no manifest")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{source}:{line} not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                          "save the manifest as UTF-8") from None
    bad = _CONTROL.search(text)
    if bad:
        line = text[:bad.start()].count("\n") + 1
        raise ConfigError(f"{source}:{line} control character {bad.group()!r} in the manifest; "
                          "only tab, newline and carriage return are allowed")
    loader = _Loader(text)
    loader.source = source
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{source}:1 the file is empty; expected a manifest mapping")
        builder = _Builder(loader, source)
        return builder.build(node, ()), builder.lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        detail = e.problem or e.context or "unreadable"
        if e.problem and e.context and e.context_mark:
            detail += f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(f"{source}:{line} invalid YAML: {detail}") from None
    except yaml.YAMLError as e:  # the reader's errors carry no mark
        raise ConfigError(f"{source}:1 invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


def dotted(path: Path_) -> str:
    """('stages', 2, 'init', 'from') -> 'stages[2].init.from'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_of(lines: dict[Path_, int], path: Path_) -> int:
    """Line of the deepest prefix of `path` that the file has (a missing key points at its parent)."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return 1
