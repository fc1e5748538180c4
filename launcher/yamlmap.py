"""Safe YAML loading that remembers the line of every key, so errors can say `file:line key.path`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from launcher.errors import ConfigError

Path_ = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _build(node: yaml.Node, path: Path_, lines: dict[Path_, int], loader: _Loader, source: str) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int)):
                raise ConfigError(
                    f"{source}:{key_node.start_mark.line + 1} {dotted(path) or '<top>'}: keys must be plain scalars")
            key_path: Path_ = path + (key,)
            if key in out:
                raise ConfigError(
                    f"{source}:{key_node.start_mark.line + 1} {dotted(key_path)}: duplicate key"
                    f" (first at line {lines[key_path]})"
                )
            lines[key_path] = key_node.start_mark.line + 1
            out[key] = _build(value_node, key_path, lines, loader, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), lines, loader, source) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_yaml(file: Path) -> tuple[Any, dict[Path_, int]]:
    """Parse `file` with YAML's safe schema; return (data, {key path: line})."""
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{source}:1 the file is empty; expected a manifest mapping")
        lines: dict[Path_, int] = {}
        return _build(node, (), lines, loader, source), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        detail = e.problem or e.context or "unreadable"
        if e.problem and e.context and e.context_mark:
            detail += f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(f"{source}:{line} invalid YAML: {detail}") from None
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
