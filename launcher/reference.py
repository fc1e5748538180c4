"""The manifest reference page (docs/reference/manifest.md), written from the manifest's JSON Schema.

The schema is what `baton schema` prints: pydantic's, from the manifest models and their field descriptions. So a
new field or kind appears on the page by regenerating it (`baton schema --format markdown -o
docs/reference/manifest.md`), never by a prose edit, and tests/test_schema.py fails while the page is stale.
"""

from __future__ import annotations

import json
from typing import Any

HEADER = """# Manifest reference

Every key a manifest may hold, with its type, its default and what it does. This page is generated from the
manifest's schema (`baton schema --format markdown -o docs/reference/manifest.md`); the same schema, as JSON, is
[manifest.schema.json](../manifest.schema.json), which editors can check a manifest against. `baton validate`
checks more than the schema can say (files, labels, DeepSpeed configs, the stages' inputs).

A manifest is `version`, `run`, `defaults` (inherited by every stage), `evals` (shared eval sets) and `stages`.
Each stage's `kind` says which of the tables under [Stages](#stages) applies; the sections those tables name
(`train`, `data`, …) are under [Sections](#sections).
"""


def markdown(schema: dict[str, Any]) -> str:
    """The reference page for `schema` (a manifest's JSON Schema, as launcher.cli.schema() returns it)."""
    defs: dict[str, dict[str, Any]] = schema.get("$defs", {})
    kinds = by_kind(schema["properties"]["stages"]["items"])
    stage_defs = {_name(ref): kind for kind, ref in kinds.items()}
    out = [HEADER, "## The manifest\n", _table(schema), "## Stages\n"]
    out.append("The `kind` key of a stage picks its table: " + ", ".join(f"[`{k}`](#kind-{k})" for k in sorted(kinds))
               + ".\n")
    for kind in sorted(kinds):
        definition = defs[_name(kinds[kind])]
        intro = definition.get("description") or definition["properties"]["kind"].get("description", "")
        out += [f"### `{kind}` {{ #kind-{kind} }}\n", _cell(_text(intro)) + "\n", _table(definition)]
    out.append("## Sections\n")
    for name in sorted(set(defs) - set(stage_defs), key=str.lower):
        definition = defs[name]
        out += [f"### {name} {{ #{_anchor(name)} }}\n"]
        if definition.get("description"):
            out.append(_cell(_text(definition["description"])) + "\n")
        out.append(_table(definition) if definition.get("properties") else f"Type: {_type(definition)}.\n")
    return "\n".join(out).rstrip() + "\n"


def _table(definition: dict[str, Any]) -> str:
    required = set(definition.get("required", []))
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, prop in definition.get("properties", {}).items():
        default = "required" if key in required else (f"`{json.dumps(prop['default'])}`" if "default" in prop
                                                      else "")
        rows.append(f"| `{key}` | {_type(prop)} | {_cell(default)} | {_cell(_text(prop.get('description', '')))} |")
    return "\n".join(rows) + "\n"


def _type(prop: dict[str, Any]) -> str:
    """A schema's type in words, sections linked."""
    if "$ref" in prop:
        name = _name(prop["$ref"])
        return f"[{name}](#{_anchor(name)})"
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if by_kind(prop):
        return "a stage (its `kind` picks the table)"
    for union in ("anyOf", "oneOf"):
        if union in prop:
            options = [o for o in prop[union] if o.get("type") != "null"]
            nullable = len(options) < len(prop[union])
            return " or ".join(dict.fromkeys(_type(o) for o in options)) + (" or null" if nullable else "")
    kind = prop.get("type")
    if kind == "array":
        items = prop.get("items")
        return f"list of {_type(items)}" if items else "list"
    if kind == "object":
        values = prop.get("additionalProperties") or next(iter(prop.get("patternProperties", {}).values()), None)
        return f"map of name → {_type(values)}" if isinstance(values, dict) else "mapping"
    if isinstance(kind, list):
        return " or ".join(kind)
    bounds = [f"{sign} {prop[key]}" for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                      ("maximum", "≤"), ("exclusiveMaximum", "<")) if key in prop]
    return (kind or "any") + (f" ({', '.join(bounds)})" if bounds else "")


def by_kind(prop: dict[str, Any]) -> dict[str, str]:
    """{kind: its definition's $ref} of a schema that picks a definition by `kind` (if/then, launcher.manifest's
    json_schema), else {}."""
    return {rule["if"]["properties"]["kind"]["const"]: rule["then"]["$ref"] for rule in prop.get("allOf", [])
            if "kind" in rule.get("if", {}).get("properties", {})}


def _name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _anchor(name: str) -> str:
    return "section-" + name.lower()


def _text(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    """`text` as Markdown shows it in a table cell: outside `code`, `<name>` is not an HTML tag nor `|` a column."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "`".join(parts)
