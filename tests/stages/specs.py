"""Stage specs for tests, made by the launcher's own `resolve` from a small manifest, and a runner that starts a
stage's ranks directly (no driver, no ledger), forked from one warm process (tests/stages/forked.py) or under
torchrun (`start`, and all of it with BATON_TEST_TORCHRUN=1): the tests check the real contract."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from contract.layout import stage_dir
from contract.spec import Spec
from launcher.manifest import load
from launcher.resolve import Resolved, build_spec, resolve
from tests.stages import forked

REPO = Path(__file__).resolve().parents[2]
# BATON_TEST_TORCHRUN=1: `run` and the kills start torchrun, as before the forked ranks (tests/stages/forked.py)
TORCHRUN = bool(os.environ.get("BATON_TEST_TORCHRUN"))
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
        proc = self.launch(spec, timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        result: dict[str, Any] = json.loads(Path(spec.stage_dir, "result.json").read_text())
        self.outputs[name] = result["output"]
        return result, proc.stdout

    def launch(self, spec: Spec, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the stage's ranks to their end, whatever it is: forked, or under torchrun with BATON_TEST_TORCHRUN
        (whose exit code is then torchrun's: 1 for any failing rank)."""
        if TORCHRUN:
            return subprocess.run(self.command(spec), cwd=REPO, env=self.env(), capture_output=True, text=True,
                                  timeout=timeout)
        code, stdout, stderr = forked.run(spec.kind, write_spec(spec), spec.world_size, self.env(), self.logs(spec),
                                          timeout)
        return subprocess.CompletedProcess(self.command(spec), code, stdout, stderr)

    def logs(self, spec: Spec) -> Path:
        """Where the forked ranks of `spec`'s stage write their stdout and stderr (outside its stage folder)."""
        return self.root / "forked" / spec.stage

    def folder(self, name: str) -> Path:
        return stage_dir(self.run_dir, name)

    def interrupt(self, spec: Spec, ready: Callable[[], bool], sig: int = signal.SIGKILL) -> list[int]:
        """Start the stage and, once `ready()`, interrupt it: SIGKILL every rank at once (and torchrun, under it), as a
        crashed machine would; any other signal goes to rank 0 alone, as Ctrl-C or Slurm's --signal reach one rank
        (the ranks agree on a stop). Returns each rank's exit code once they have ended (under torchrun, from its
        failure summary; none after a SIGKILL)."""
        deadline = time.monotonic() + 300

        def wait(alive: Callable[[], bool], said: Callable[[], str]) -> None:
            while not ready():
                assert alive(), f"stage ended before it could be interrupted: {said()[-4000:]}"
                assert time.monotonic() < deadline, "not ready to be interrupted after 300 s"
                time.sleep(0.005)

        if not TORCHRUN:
            ranks = forked.Ranks(spec.kind, write_spec(spec), spec.world_size, self.env(), self.logs(spec))
            wait(ranks.alive, lambda: ranks.output("err"))
            if sig == signal.SIGKILL:
                ranks.kill()
            else:
                os.kill(ranks.procs[0].pid, sig)
                ranks.wait(timeout=120)
            return [p.exitcode if p.exitcode is not None else -9 for p in ranks.procs]
        proc = self.start(spec, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        wait(lambda: proc.poll() is None, lambda: proc.stderr.read() if proc.stderr else "")
        if sig != signal.SIGKILL:
            psutil.Process(proc.pid).children()[0].send_signal(sig)  # rank 0: torchrun's first worker
            _, err = proc.communicate(timeout=120)
            return [int(code) for code in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", err, re.M)]
        # torchrun starts each rank in a session of its own: kill the tree, not a process group.
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in tree:
            p.kill()
        psutil.wait_procs(tree, timeout=30)
        proc.wait()
        proc.stderr.close()
        return []

    def kill_after_first_checkpoint(self, spec: Spec, tag: str = "step*") -> None:
        """SIGKILL the stage's ranks (`interrupt`) once a COMPLETE checkpoint (`tag`, a glob) exists."""
        folder = Path(spec.stage_dir)
        self.interrupt(spec, lambda: bool(list(folder.glob(f"ckpt/{tag}/COMPLETE"))))
        assert not (folder / "result.json").exists(), "the kill came too late: the stage had finished"


class Lazy(dict):
    """Results made on first use (`make(key)`), so a tier that asks for one trains only that one."""

    def __init__(self, make: Callable[[Any], Any]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> Any:
        self[key] = value = self.make(key)
        return value


def stepped(folder: Path) -> Callable[[], bool]:
    """Whether the stage in `folder` has taken its first step: when to interrupt a stage mid-training."""
    return lambda: (folder / "metrics.jsonl").exists() and bool(records(folder, "first_step"))


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
