"""Continuing from a checkpoint: a head the checkpoint lacks is reported and recorded, a checkpoint that lacks the
model's body and a tokenizer that is not the model's own are refused (exit 2) before anything is written.

The checkpoints are tiny BERTs made here: `encoder/` holds only a BertModel (no masked-LM head, as
all-MiniLM-L6-v2), `unrelated/` holds a GPT-2's weights under that BERT's config. The fast tests call the stage
runtime in-process on specs the launcher resolved; the slow ones run the stage program itself.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stages.runtime import models
from stages.runtime.spec import SpecError
from tests.stages import specs

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer(folder: Path, words: list[str]):
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={token: i for i, token in enumerate(SPECIALS + words)})
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    root = tmp_path_factory.mktemp("domain")
    data = specs.copy_data(root / "data")
    counts = Counter(w for line in data["pretrain.txt"].read_text().lower().split("\n") for w in line.split())
    words = [w for w, _ in counts.most_common(300)]
    tok = _tokenizer(root / "encoder", words)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(root / "encoder")
    _tokenizer(root / "same", words)  # another folder, the same vocabulary
    _tokenizer(root / "reordered", words[::-1])  # the same size, other ids
    _tokenizer(root / "extended", words + ["zebu", "quokka"])  # the model's ids kept, two tokens more
    shutil.copytree(root / "encoder", root / "unrelated")
    GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2)).save_pretrained(root / "gpt2")
    shutil.copy(root / "gpt2" / "model.safetensors", root / "unrelated" / "model.safetensors")
    return {"root": root} | {name: root / name for name in ("encoder", "same", "reordered", "extended", "unrelated")}


def stage(name: str, init: str, tokenizer: str | None = None, nproc: int = 2, zero: int = 2) -> str:
    return f"""
  - name: {name}
    kind: mlm
    init: {{pretrained: {init}}}
    {f"tokenizer: {{pretrained: {tokenizer}}}" if tokenizer else ""}
    launcher: {{nproc_per_node: {nproc}}}
    deepspeed: {{config: zero{zero}}}
    data: {{train: data/pretrain.txt, eval: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: 4, micro_batch_size: 4, lr: 1.0e-3, log_every: 2}}"""


@pytest.fixture(scope="module")
def work(folders) -> specs.Stages:
    manifest = "version: 1\nrun: {name: domain}\nstages:" + "".join([
        stage("from-encoder", "encoder", zero=3),  # parameters partitioned while loading: the harder case
        stage("same", "encoder", "same"),
        stage("one-process", "encoder", "same", nproc=1),
        stage("unrelated", "unrelated"),
    ]) + "\n"
    return specs.Stages(folders["root"], manifest, folders["root"] / "hf")


def with_tokenizer(work: specs.Stages, folders: dict[str, Path], name: str, base: str = "same"):
    """Stage `base`'s spec with tokenizer folder `name` instead: what a stage meets when `validate` could not
    compare the two (a tokenizer from an earlier stage's output, unknown before that stage ran)."""
    from contract.files import dir_digest

    spec = work.spec(base)
    ref = spec.ref("tokenizer").model_copy(update={"path": str(folders[name]), "digest": dir_digest(folders[name])})
    return spec.model_copy(update={"inputs": spec.inputs | {"tokenizer": ref}, "stage_dir": str(work.folder(name))})


def test_validate_refuses_local_folders_of_other_tokenizers(folders) -> None:
    from launcher.errors import ConfigError
    from launcher.manifest import load
    from launcher.resolve import resolve

    path = folders["root"] / "refused.yaml"
    path.write_text("version: 1\nrun: {name: refused}\nstages:" + stage("reordered", "encoder", "reordered")
                    + stage("same", "encoder", "same") + "\n")
    with pytest.raises(ConfigError) as e:
        resolve(load(path))
    (problem,) = e.value.problems
    assert f"refused.yaml:7 stages[0].tokenizer.pretrained: init ({folders['encoder']}) and tokenizer " \
           f"({folders['reordered']}) hold different tokenizers" in problem


def head_names() -> list[str]:
    """The parameters of BertForMaskedLM outside its encoder: what a BertModel checkpoint cannot give."""
    from transformers import AutoModelForMaskedLM, BertConfig

    model = AutoModelForMaskedLM.from_config(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                        num_attention_heads=1, intermediate_size=8))
    return sorted(n for n, _ in model.named_parameters() if not n.startswith("bert."))


# ----------------------------------------------------------------- fast: the runtime in-process


def test_the_same_vocabulary_from_another_folder_is_accepted(work) -> None:
    assert len(models.load_tokenizer(work.spec("same"))) == 305


@pytest.mark.parametrize(("name", "why"), [
    ("reordered", r"^inputs\.tokenizer: .*/reordered is not the tokenizer of inputs\.init .*/encoder: 300 of the "
                  r"model's 305 tokens have another id in it \(305 tokens\); .* Leave tokenizer: out"),
    ("extended", r"^inputs\.tokenizer: .*/extended is not the tokenizer of inputs\.init .*/encoder: it adds 2 tokens "
                 r"to the model's 305, and vocabulary extension \(new embedding rows\) is not supported"),
])
def test_a_tokenizer_that_is_not_the_models_own_is_refused(work, folders, name: str, why: str) -> None:
    with pytest.raises(SpecError, match=why):
        models.load_tokenizer(with_tokenizer(work, folders, name))


def test_a_checkpoint_without_the_models_body_is_refused(work) -> None:
    from transformers import AutoModelForMaskedLM

    spec = work.spec("unrelated")
    specs.write_spec(spec)
    tokenizer = models.load_tokenizer(spec)
    with pytest.raises(SpecError, match=r"^inputs\.init\.path: .*/unrelated lacks 37 of the 37 weights of the body of "
                                        r"BertForMaskedLM \(bert\.embeddings\..* it is not a checkpoint of this model"):
        models.build_model(spec, AutoModelForMaskedLM, tokenizer, resume=False)
    assert not Path(spec.stage_dir, "metrics.jsonl").exists()


# ----------------------------------------------------------------- slow: the stage program


@pytest.mark.slow
def test_a_missing_head_is_reported_on_the_terminal_and_recorded(work, folders) -> None:
    spec = work.spec("from-encoder")
    _, out = work.run_with_output("from-encoder", spec)
    heads = head_names()
    lines = [line for line in out.splitlines() if "newly initialised" in line]
    assert len(lines) == 1, out  # rank 0 alone, one line
    assert lines[0].startswith("from-encoder: not in the checkpoint, newly initialised (random): "
                               + ", ".join(heads))
    assert f"the rest of BertForMaskedLM loaded from {folders['encoder']}" in lines[0]
    (init,) = specs.records(Path(spec.stage_dir), "init")
    assert init["newly_initialized"] == heads and init["model"] == "BertForMaskedLM"
    assert init["source"] == str(folders["encoder"]) and init["newly_initialized_values"] > 0
    # BertModel's pooler, which BertForMaskedLM has not (transformers' ZeRO-3 loading does not list unused tensors)
    assert set(init["unused"]) <= {"pooler.dense.bias", "pooler.dense.weight"}
    assert json.loads(Path(spec.stage_dir, "result.json").read_text())["status"] == "done"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_tokenizer_of_other_ids_exits_2_and_writes_nothing(work, folders) -> None:
    """One process without torchrun, which would fold the exit code into 1."""
    spec = with_tokenizer(work, folders, "reordered", base="one-process")
    env = work.env() | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}
    argv = [sys.executable, "-m", "stages.mlm", "--spec", str(specs.write_spec(spec))]
    proc = subprocess.run(argv, cwd=specs.REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"baton stage error: inputs.tokenizer: {folders['reordered']} is not the tokenizer of "
                           f"inputs.init {folders['encoder']}: 300 of the model's 305 tokens have another id")
    assert sorted(p.name for p in Path(spec.stage_dir).iterdir()) == ["error.json", "spec.json"]
    assert json.loads(Path(spec.stage_dir, "error.json").read_text())["message"] == last.removeprefix(
        "baton stage error: ")
