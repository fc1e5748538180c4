"""The manifests the docs show are manifests baton takes: a block that says it is a shipped file
(its first line `# examples/<file>.yaml`) is that file or a verbatim excerpt of it (`# …` lines mark what is
left out); every other ```yaml block is checked against the manifest's JSON Schema: a whole manifest as it is,
a list of stages or top-level sections inside the quickstart manifest, a stage's sections inside its
classify stage. And every relative link of README.md names a file that exists (the docs site's own links are
checked by `mkdocs build --strict`)."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from launcher.cli import schema
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHIPPED = re.compile(r"# (examples/[\w./-]+\.ya?ml)")
ELIDED = {"# …", "# ..."}
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def yaml_blocks(page: Path) -> list[tuple[int, list[str]]]:
    """(line of the opening fence, the block's lines dedented by the fence's indent) of each ```yaml block."""
    lines, blocks, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.fullmatch(r"(\s*)```ya?ml\s*", lines[i])
        if fence:
            indent, start = len(fence.group(1)), i
            i += 1
            while lines[i].strip() != "```":
                i += 1
            blocks.append((start + 1, [line[indent:] for line in lines[start + 1:i]]))
        i += 1
    return blocks


BLOCKS = [(page, line, body) for page in PAGES for line, body in yaml_blocks(page)]
IDS = [f"{page.relative_to(ROOT)}:{line}" for page, line, _ in BLOCKS]


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


def _errors(manifest: object) -> list[str]:
    found = _validator().iter_errors(manifest)
    # a stage is one of the kinds (oneOf on `kind`): the kind's own errors are in the error's context
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for error in found for e in (error, *error.context)]


def as_manifest(block: object) -> object:
    """The manifest a block stands for: itself when it is one; a list of stages, or top-level sections (run,
    defaults, evals …), put into the quickstart manifest; a stage's sections put into its classify stage."""
    quickstart = yaml.safe_load(QUICKSTART.read_text())
    if isinstance(block, dict) and "stages" in block:
        return block
    if isinstance(block, list):
        return {**quickstart, "stages": block}
    assert isinstance(block, dict), f"neither a manifest, nor stages, nor sections of one: {block!r}"
    top = schema()["properties"]
    assert isinstance(top, dict)
    if set(block) <= set(top):
        return {**quickstart, **block}
    manifest = copy.deepcopy(quickstart)
    manifest["stages"][-1].update(block)
    return manifest


def excerpt_problem(body: list[str], shipped: Path) -> str | None:
    """None when `body` (after its first line) is the file, or pieces of it in order (`# …` between them)."""
    if not shipped.is_file():
        return f"{shipped.relative_to(ROOT)}: no such file"
    text = shipped.read_text().splitlines()
    pieces: list[list[str]] = [[]]
    for line in body[1:]:
        if line.strip() in ELIDED:
            pieces.append([])
        else:
            pieces[-1].append(line)
    at = 0
    for piece in pieces:
        if not piece:
            return "an empty piece between `# …` lines"
        found = next((k for k in range(at, len(text) - len(piece) + 1) if text[k:k + len(piece)] == piece), None)
        if found is None:
            return f"these lines are not in {shipped.relative_to(ROOT)} (after line {at}):\n" + "\n".join(piece)
        at = found + len(piece)
    return None


@pytest.mark.parametrize(("page", "line", "body"), BLOCKS, ids=IDS)
def test_every_manifest_block_is_a_shipped_file_or_passes_the_schema(page: Path, line: int, body: list[str]) -> None:
    where = f"{page.relative_to(ROOT)}:{line}"
    shipped = SHIPPED.fullmatch(body[0].strip()) if body else None
    if shipped:
        problem = excerpt_problem(body, ROOT / shipped.group(1))
        assert problem is None, f"{where}: {problem}"
        return
    block = yaml.safe_load("\n".join(body))
    if block is None:  # comments only, such as the editors' modeline
        assert all(not text.strip() or text.lstrip().startswith("#") for text in body), where
        return
    errors = _errors(as_manifest(block))
    assert not errors, f"{where}: {errors}"


def test_the_readme_shows_a_shipped_manifest() -> None:
    assert any(SHIPPED.fullmatch(body[0].strip()) for line, body in yaml_blocks(ROOT / "README.md") if body)


@pytest.mark.parametrize(("body", "ok"), [
    (["# examples/quickstart.yaml", *QUICKSTART.read_text().splitlines()], True),
    (["# examples/quickstart.yaml", "version: 1", "# …", "stages:", "  - name: tokenizer"], True),
    (["# examples/quickstart.yaml", "stages:", "# …", "version: 1"], False),  # out of order
    (["# examples/quickstart.yaml", "version: 2"], False),
    (["# examples/missing.yaml", "version: 1"], False),
])
def test_a_shipped_block_must_be_the_file_or_an_excerpt(body: list[str], ok: bool) -> None:
    shipped = SHIPPED.fullmatch(body[0])
    assert shipped
    assert (excerpt_problem(body, ROOT / shipped.group(1)) is None) == ok


@pytest.mark.parametrize("block", [
    {"version": 1, "stages": [{"name": "a", "kind": "mlmm"}]},
    [{"name": "a", "kind": "classify", "train": {"max_stepz": 3}}],
    {"run": {"name": "x", "report_to": ["nothing"]}},
    {"gate": {"require": ["accuracy >= 0.8"], "on_fail": "stop | retry | fallback"}},
])
def test_a_block_that_is_no_manifest_is_flagged(block: object) -> None:
    assert _errors(as_manifest(block))


def test_every_relative_link_of_the_readme_names_a_file() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:|#", link)]
    assert local, "README.md links into docs/"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
