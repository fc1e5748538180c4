"""A done stage stays done: every shipped example's fingerprints are pinned, so a change to how baton computes a
fingerprint cannot make a user's finished stages run again. Set BATON_UPDATE_GOLDEN=1 to rewrite
tests/golden/fingerprints.json, only where a fingerprint is meant to change.

Each stage is resolved the way `baton validate` and `--dry-run` resolve it (data files digested, nothing launched),
from a copy of examples/ in a temporary folder: the fingerprints hold digests, never paths, so they are the same
from any folder on any machine. An earlier stage's output stands in as a digest of its name. The model folder
that `make compress` fetches into examples/models/ is not copied: compress's teacher is pinned as reading the hub
name it then resolves to, so its fingerprint is the same whether the model was fetched or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel

from contract.fingerprint import LEFT_OUT, UNLESS_DEFAULT, fingerprinted
from launcher.manifest import load
from launcher.resolve import Resolved, build_spec, resolve

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "fingerprints.json"

# The settings no example uses, each as it changes (or leaves out of) the fingerprint: a stage whose training
# losses a later curriculum ranks by (eval.score_train, difficulty.loss_of), a logged curriculum (log_draws), hub
# data, a stage that may resume at another world size.
SETTINGS_NO_EXAMPLE_USES = """\
version: 1
run: {name: unused}
defaults: {seed: 7}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {train: data/wordnet/pretrain.txt}
    sentencepiece: {vocab_size: 500}
  - name: scorer
    kind: classify
    init: {config: {model_type: bert, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                    intermediate_size: 64}}
    tokenizer: {from: tokenizer}
    data: {train: data/wordnet/supersense_train.jsonl, eval: data/wordnet/supersense_eval.jsonl, max_length: 32}
    train: {max_steps: 20, log_every: 5}
    eval: {score_train: true}
    checkpoint: {every_steps: 10, on_world_size_change: resume}
  - name: easy_first
    kind: classify
    init: {from: scorer}
    data: {train: data/wordnet/supersense_train.jsonl, eval: data/wordnet/supersense_eval.jsonl, max_length: 32}
    train: {max_steps: 20}
    curriculum:
      order: easy_first
      difficulty: {loss_of: scorer}
      phases: [{until_step: 10, data_fraction: 0.5}, {}]
      log_draws: true
  - name: hub
    kind: mlm
    init: {from: scorer}
    data: {hub: wikitext, hub_config: wikitext-2-raw-v1, eval_split: validation}
    train: {epochs: 1}
"""


def copy_examples(to: Path) -> Path:
    """The example manifests and their data (not examples/models/), plus the manifest of the settings no example
    uses, in `to`."""
    shutil.copytree(REPO / "examples" / "data", to / "data")
    for manifest in (REPO / "examples").glob("*.yaml"):
        shutil.copy(manifest, to / manifest.name)
    (to / "unused_settings.yaml").write_text(SETTINGS_NO_EXAMPLE_USES)
    return to


def fingerprints(examples: Path, run_dir: Path) -> dict[str, dict[str, dict[str, str]]]:
    """{manifest: {instance: {fingerprint, fingerprint_any_world}}} of every manifest in `examples`; where a stage
    has retry attempts or variants, once more as "<manifest>, last instances handed on": each stage's last
    instance is the one later stages read."""
    out = {}
    for manifest in sorted(examples.glob("*.yaml")):
        stages = resolve(load(manifest))
        last = {r.group: r.name for r in stages}
        readings = {manifest.name: {g: g for g in last}}
        if any(name != group for group, name in last.items()):
            readings[f"{manifest.name}, last instances handed on"] = last
        for title, handed_on in readings.items():
            out[title] = {r.name: _pair(r, run_dir, handed_on) for r in stages}
    return out


def _pair(r: Resolved, run_dir: Path, handed_on: dict[str, str]) -> dict[str, str]:
    outputs = {group: {"instance": name, "digest": "sha256:" + hashlib.sha256(name.encode()).hexdigest()}
               for group, name in handed_on.items()}
    spec = build_spec(r, run_dir, outputs)
    assert spec is not None, f"{r.name}: an upstream stage has no stand-in output"
    return {"fingerprint": spec.fingerprint, "fingerprint_any_world": spec.fingerprint_any_world}


def test_every_example_keeps_its_fingerprints(tmp_path: Path) -> None:
    got = fingerprints(copy_examples(tmp_path / "elsewhere"), tmp_path / "run")
    if os.environ.get("BATON_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(golden), "a new example? pin its fingerprints: BATON_UPDATE_GOLDEN=1"
    changed = {f"{m}: {stage}" for m in got for stage in set(got[m]) | set(golden[m])
               if got[m].get(stage) != golden[m].get(stage)}
    assert not changed, f"fingerprints changed, so these done stages would rerun: {sorted(changed)}"


def test_a_field_added_unless_default_keeps_the_fingerprints_of_stages_without_it() -> None:
    class Before(BaseModel):
        lr: float = 1e-3

    class After(Before):
        sft: Annotated[dict[str, Any] | None, UNLESS_DEFAULT] = None
        log_every: Annotated[int, LEFT_OUT] = 10

    assert fingerprinted(After(log_every=5)) == fingerprinted(Before()) == {"lr": 1e-3}
    assert fingerprinted(After(sft={"template": "chat"})) == {"lr": 1e-3, "sft": {"template": "chat"}}
