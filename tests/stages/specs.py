"""Stage specs for tests, made by the launcher's own `resolve` from a small manifest, and a runner
that starts a stage under torchrun directly (no driver, no ledger): the tests check the real contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from contract.layout import stage_dir
from contract.spec import Spec
from launcher.manifest import load
from launcher.resolve import Resolved, build_spec, resolve
from tests.stages import forked

REPO = Path(__file__).resolve().parents[2]
WORDNET = REPO / "examples" / "data" / "wordnet"

TINY_BERT = ("{model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
             "intermediate_size: 64, max_position_embeddings: 64}")


def head(run: str) -> str:
    """The start of a test manifest: run `run` on 2 processes, and a tokenizer stage trained on data/pretrain.txt."""
    return f"""version: 1
run: {{name: {run}}}
defaults:
  launcher: {{nproc_per_node: 2}}
stages:
  - name: tokenizer
    kind: tokenizer
    data: {{train: data/pretrain.txt}}
    sentencepiece: {{vocab_size: 1000}}"""


def copy_data(dest: Path, *, pretrain_lines: int = 400, labelled_lines: int = 200) -> dict[str, Path]:
    """Small slices of the WordNet demo data, copied so tests never write near the repo."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("pretrain.txt", pretrain_lines), ("supersense_train.jsonl", labelled_lines),
                    ("supersense_eval.jsonl", labelled_lines // 2)):
        lines = (WORDNET / name).read_text().splitlines()[:n]
        (dest / name).write_text("\n".join(lines) + "\n")
        out[name] = dest / name
    return out


class Stages:
    """A manifest resolved by the launcher; its stages' specs built as the driver builds them.

    Upstream outputs come from the result.json of stages this object ran (or from `outputs`).
    """

    def __init__(self, root: Path, manifest: str, hf_home: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        path = root / "stages.yaml"
        path.write_text(manifest)
        self.resolved: dict[str, Resolved] = {r.name: r for r in resolve(load(path))}
        self.root = root
        self.run_dir = root / "run"
        self.hf_home = hf_home
        self.outputs: dict[str, dict[str, Any]] = {}

    def spec(self, name: str, outputs: dict[str, dict[str, Any]] | None = None) -> Spec:
        spec = build_spec(self.resolved[name], self.run_dir, self.outputs | (outputs or {}))
        assert spec is not None, f"test bug: {name} needs an upstream stage that has not run"
        return spec

    def command(self, spec: Spec) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(spec.world_size), "-m", f"stages.{spec.kind}", "--spec", str(write_spec(spec))]

    def env(self) -> dict[str, str]:
        return os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(self.hf_home),
                             "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}

    def start(self, spec: Spec, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(spec), cwd=REPO, env=self.env(), start_new_session=True, text=True,
                                **kwargs)

    def run(self, name: str, spec: Spec | None = None, timeout: float = 300) -> dict[str, Any]:
        """Run the stage to the end (exit 0 asserted) and return its result.json."""
        return self.run_with_output(name, spec, timeout)[0]

    def run_with_output(self, name: str, spec: Spec | None = None,
                        timeout: float = 300) -> tuple[dict[str, Any], str]:
        """`run`, and the ranks' stdout (the progress lines are rank 0's)."""
        spec = spec or self.spec(name)
        if os.environ.get("BATON_TEST_TORCHRUN"):
            proc = subprocess.run(self.command(spec), cwd=REPO, env=self.env(), capture_output=True, text=True,
                                  timeout=timeout)
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        else:
            code, stdout, stderr = forked.run(spec.kind, write_spec(spec), spec.world_size, self.env(),
                                              self.root / "forked" / spec.stage, timeout)
        assert code == 0, stdout[-3000:] + stderr[-6000:]
        result: dict[str, Any] = json.loads(Path(spec.stage_dir, "result.json").read_text())
        self.outputs[name] = result["output"]
        return result, stdout

    def folder(self, name: str) -> Path:
        return stage_dir(self.run_dir, name)

    def kill_after_first_checkpoint(self, spec: Spec, tag: str = "step*") -> None:
        """Start the stage and SIGKILL torchrun and its workers once a COMPLETE checkpoint (`tag`, a glob) exists."""
        folder = Path(spec.stage_dir)
        proc = self.start(spec, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        deadline = time.monotonic() + 300
        while not list(folder.glob(f"ckpt/{tag}/COMPLETE")):
            assert proc.poll() is None, f"stage ended before checkpoint {tag}: {proc.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint {tag} after 300 s"
            time.sleep(0.01)
        # torchrun starts each rank in a session of its own: kill the tree, not a process group.
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in tree:
            p.kill()
        psutil.wait_procs(tree, timeout=30)
        proc.wait()
        proc.stderr.close()
        assert not (folder / "result.json").exists(), "the kill came too late: the stage had finished"


def records(folder: Path, event: str) -> list[dict[str, Any]]:
    """The metrics.jsonl records of one event in a stage folder."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def write_spec(spec: Spec) -> Path:
    folder = Path(spec.stage_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.json"
    path.write_text(spec.model_dump_json(indent=2))
    return path
