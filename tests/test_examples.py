"""Everything baton ships must load: the example manifests, the DeepSpeed templates, the JSON Schema."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from contract.kinds import KINDS
from launcher import dsconfig
from launcher.errors import ConfigError
from tests.conftest import cli_in_process

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml")) + sorted((REPO / "examples").rglob("*.yml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_there_is_something_to_check() -> None:
    assert EXAMPLES, "no example manifests found"
    assert {p.stem for p in DS_CONFIGS} >= {"zero0", "zero1", "zero2", "zero3", "zero3_offload"}


@pytest.mark.parametrize("manifest", EXAMPLES, ids=[str(p.relative_to(REPO)) for p in EXAMPLES])
def test_example_validates(manifest: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    manifest = _with_models(manifest, tmp_path / "copy")
    proc = cli_in_process(["validate", str(manifest)], work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith(f"{manifest}: ok, "), proc.stdout
    assert list(work.iterdir()) == []  # validating writes nothing


def _with_models(manifest: Path, copy: Path) -> Path:
    """The manifest, or, where it names a pretrained model that `make` fetches into examples/models/ (compress:
    all-MiniLM-L6-v2) and that is not there, a copy of it beside the shipped data and a small stand-in model of
    the same kind (a BERT classifier with a WordPiece tokenizer), so that the manifest itself is checked."""
    missing = [name for name in re.findall(r"pretrained: (models/[^}\s]+)", manifest.read_text())
               if not (manifest.parent / name).is_dir()]
    if not missing:
        return manifest
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    copy.mkdir()
    (copy / "data").symlink_to(REPO / "examples" / "data")
    vocab = copy / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]) + "\n")
    for name in missing:
        model = BertForSequenceClassification(BertConfig(vocab_size=31, hidden_size=16, num_hidden_layers=2,
                                                         num_attention_heads=2, intermediate_size=32))
        model.save_pretrained(copy / name)
        BertTokenizer(vocab=str(vocab)).save_pretrained(copy / name)
    (copy / manifest.name).write_text(manifest.read_text())
    return copy / manifest.name


TRAIN: dict[str, Any] = {"micro_batch_size": 8, "grad_accum": 2, "lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                         "weight_decay": 0.01, "max_grad_norm": 1.0}


def autos(node: Any, path: str = "") -> list[str]:
    """Key paths still saying "auto"."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in autos(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("template", DS_CONFIGS, ids=[p.stem for p in DS_CONFIGS])
def test_ds_config_filled_is_accepted_by_deepspeed(template: Path, world_size: int, precision: str) -> None:
    config = dsconfig.fill(dsconfig.read_template(template, template.name), TRAIN, precision, world_size, template.name)
    assert autos(config) == []
    assert config["train_batch_size"] == 8 * 2 * world_size
    assert config["optimizer"]["params"]["lr"] == 3e-4
    assert config["bf16"]["enabled"] is (precision == "bf16")
    assert "scheduler" not in config  # the stage builds the schedule from train
    dsconfig.check_with_deepspeed(config, template.name)


def test_deepspeed_check_can_say_no() -> None:
    """The check above means something: DeepSpeed does reject a bad filled config."""
    template = REPO / "ds_configs" / "zero2.json"
    config = dsconfig.fill(dsconfig.read_template(template, "zero2"), TRAIN, "fp32", 2, "zero2")
    config["zero_optimization"]["stage"] = 7
    with pytest.raises(ConfigError, match="DeepSpeed rejects"):
        dsconfig.check_with_deepspeed(config, "zero2")


def test_a_config_deepspeed_accepted_is_not_judged_again(tmp_path: Path) -> None:
    """A launch of an unchanged manifest does not import DeepSpeed (seconds) to judge its config again; a config
    it rejected is judged every time."""
    template = REPO / "ds_configs" / "zero2.json"
    good = dsconfig.fill(dsconfig.read_template(template, "zero2"), TRAIN, "fp32", 2, "zero2")
    bad = json.loads(json.dumps(good))
    bad["zero_optimization"]["stage"] = 7
    probe = ("import json, sys; from launcher import dsconfig; from launcher.errors import ConfigError\n"
             "try: dsconfig.check_with_deepspeed(json.loads(sys.argv[1]), 'zero2'); print('ok', end=' ')\n"
             "except ConfigError: print('rejected', end=' ')\n"
             "print('imported' if 'deepspeed' in sys.modules else 'not imported')")
    env = {**os.environ, "BATON_CACHE_DIR": str(tmp_path)}

    def check(config: dict[str, Any]) -> str:
        return subprocess.run([sys.executable, "-c", probe, json.dumps(config)], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True).stdout.strip()

    assert [check(good), check(good)] == ["ok imported", "ok not imported"]
    assert [check(bad), check(bad)] == ["rejected imported", "rejected imported"]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return (([node["$ref"]] if isinstance(node.get("$ref"), str) else [])
                + [r for v in node.values() for r in refs(v)])
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_schema_is_json_and_knows_every_kind(tmp_path: Path) -> None:
    proc = cli_in_process(["schema"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    defs = schema["$defs"]

    assert set(schema["required"]) >= {"run", "stages"}
    assert schema["additionalProperties"] is False
    stages = schema["properties"]["stages"]["items"]  # the kind picks the stage's definition (if/then)
    kinds = {rule["if"]["properties"]["kind"]["const"]: rule["then"]["$ref"] for rule in stages["allOf"]}
    assert set(kinds) == set(KINDS) and stages["properties"]["kind"]["enum"] == list(kinds)
    for kind, ref in kinds.items():
        stage = defs[ref.removeprefix("#/$defs/")]
        assert stage["properties"]["kind"]["const"] == kind
        assert stage["additionalProperties"] is False
    assert {"from", "pretrained", "config"} <= set(defs["ModelRef"]["properties"])  # aliases, as written in YAML
    for ref in refs(schema):
        assert ref.startswith("#/$defs/") and ref.removeprefix("#/$defs/") in defs, ref


def undocumented(schema: dict[str, Any]) -> list[str]:
    return [f"{name}.{key}" for name, model in schema["$defs"].items()
            for key, field in model.get("properties", {}).items() if not field.get("description")]


def test_schema_documents_every_field(tmp_path: Path) -> None:
    assert undocumented(json.loads(cli_in_process(["schema"], tmp_path).stdout)) == []
