"""Fuzzing the manifest loader: whatever the file holds, `load` + `resolve` end in a value or a BatonError.

Two sources of input: YAML-ish text (YAML's punctuation, anchors, aliases, merge keys, tags, odd
bytes), and BASE of test_manifest_errors with one random edit (a key dropped, a value replaced by
something of another type, a key added). In-process and small, so it runs with the fast tests.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.errors import BatonError
from launcher.manifest import load
from launcher.resolve import resolve
from tests.test_manifest_errors import BASE, write_inputs

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

TOKENS = ["\n", "  ", "- ", ": ", "{", "}", "[", "]", ",", "&a ", "*a", "&b ", "*b", "<<: ", "!!binary ", "!!set ",
          "!foo ", "? ", "|", ">", "'", '"', "#", "---\n", "...\n", "%YAML 1.1\n", "\t", "\x00", "\x85", "\ufeff",
          "version", "run", "name", "stages", "kind", "mlm", "tokenizer", "train", "data", "defaults", "seed",
          "1", "-1", "1e20", "1.0e+20", ".nan", ".inf", "true", "null", "~", "2024-01-01", "é", "x"]

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                    st.sampled_from(["tok", "pre", "cls", "zero3", "./custom.json", "train.txt", "bert", "é" * 80]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def check(folder: Path, text: str | bytes) -> None:
    manifest = folder / "fuzz.yaml"
    if isinstance(text, bytes):
        manifest.write_bytes(text)
    else:
        manifest.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        resolve(load(manifest))
    except BatonError:
        pass


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_yamlish_text(tmp_path: Path, tokens: list[str]) -> None:
    check(tmp_path, "".join(tokens))


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    check(tmp_path, data)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


BASE_DATA = yaml.safe_load(BASE)
BASE_PATHS = _paths(BASE_DATA)[1:]


@FUZZ
@given(st.sampled_from(BASE_PATHS), st.sampled_from(["drop", "replace", "add"]), VALUES, st.text(max_size=12))
def test_mutated_manifest(tmp_path: Path, path: tuple, how: str, value: Any, key: str) -> None:
    write_inputs(tmp_path)
    data = copy.deepcopy(BASE_DATA)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "drop":
        del parent[last]
    elif how == "replace":
        parent[last] = value
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    else:
        parent[last] = {key: value}
    check(tmp_path, yaml.safe_dump(data, allow_unicode=True))
