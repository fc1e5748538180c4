"""The manifest's JSON Schema as editors use it: the shipped copy is `baton schema`'s output, every example manifest
passes it, and it flags what `baton validate` refuses (an unknown option, another kind's option, a wrong type)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from launcher.cli import main, schema
from tests.conftest import ROOT

SHIPPED = ROOT / "docs" / "manifest.schema.json"
REFERENCE = ROOT / "docs" / "reference" / "manifest.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema=../docs/manifest.schema.json"


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema())
    return jsonschema.Draft202012Validator(schema())


def test_the_shipped_schema_is_baton_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    assert main(["schema", "-o", str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.json").read_text() == printed
    assert json.loads(printed) == json.loads(SHIPPED.read_text()), \
        "docs/manifest.schema.json is out of date: `baton schema -o docs/manifest.schema.json`"


def test_the_reference_page_is_the_schema_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "--format", "markdown"]) == 0
    assert capsys.readouterr().out == REFERENCE.read_text(), \
        "docs/reference/manifest.md is out of date: `baton schema --format markdown -o docs/reference/manifest.md`"
    page = REFERENCE.read_text()
    defs = schema()["$defs"]
    assert isinstance(defs, dict)
    for name, definition in defs.items():  # every section and every key of it is on the page, linked by its anchor
        assert f"{{ #section-{name.lower()} }}" in page or name.endswith("Stage"), name
        for key in definition.get("properties", {}):
            assert f"| `{key}` |" in page, f"{name}.{key}"
    assert "| `max_steps` | integer (> 0, ≤ 1000000000) or null | `null` |" in page


@pytest.mark.parametrize("manifest", EXAMPLES, ids=lambda p: p.name)
def test_every_example_passes_the_schema_and_names_it_for_editors(manifest: Path) -> None:
    text = manifest.read_text()
    assert text.splitlines()[0] == MODELINE, f"{manifest.name}: its first line is not `{MODELINE}`"
    found = _validator().iter_errors(yaml.safe_load(text))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]
    assert not errors, errors


@pytest.mark.parametrize(("change", "where", "says"), [
    (lambda m: m["stages"][1]["train"].update(max_stepz=3), "stages/1/train", "'max_stepz' was unexpected"),
    (lambda m: m["stages"][1].update(sentencepiece={"vocab_size": 100}), "stages/1",  # the tokenizer's option on mlm
     "'sentencepiece' was unexpected"),
    (lambda m: m["stages"][1]["train"].update(max_steps="many"), "stages/1/train/max_steps", "'many'"),
    (lambda m: m["stages"][1].update(kind="mlmm"), "stages/1/kind", "'mlmm' is not one of ['classify'"),
])
def test_the_schema_flags_what_validate_refuses(change, where: str, says: str) -> None:  # type: ignore[no-untyped-def]
    """Each error is reported where it is, with what is wrong, by a generic validator (as an editor shows it): a
    stage's kind is chosen by if/then, not by a `oneOf` that would answer "not valid under any of the schemas"."""
    manifest = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    change(manifest)
    errors = [("/".join(map(str, e.absolute_path)), e.message) for e in _validator().iter_errors(manifest)]
    assert errors and all(path.startswith(where) and says in message for path, message in errors), errors
