"""Malformed manifests through the real CLI.

Every case must end the same way: exit code 2, one clean stderr line that names
`file:line key.path` (and the valid choices, where baton knows them), no traceback,
nothing printed to stdout, and no run folder. A manifest is BASE with one edit;
the line of the edited manifest that ends in `#!` is the line the error must name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract.kinds import KINDS
from tests.conftest import cli_in_process

VALID_KINDS = "valid kinds: " + ", ".join(KINDS)
REPO = Path(__file__).resolve().parents[1]
WORDNET = REPO / "examples" / "data" / "wordnet"
SHIPPED_DS = ", ".join(sorted(p.stem for p in (REPO / "ds_configs").glob("*.json")))

BASE = """\
version: 1
run: {name: bad}
defaults:
  launcher: {nproc_per_node: 2}
stages:
  - name: tok
    kind: tokenizer
    data: {train: train.txt}
    sentencepiece: {vocab_size: 100}
  - name: pre
    kind: mlm
    init:
      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}
    tokenizer: {from: tok}
    data: {train: train.txt, eval: eval.txt}
    train: {max_steps: 10, micro_batch_size: 4}
  - name: cls
    kind: classify
    init: {from: pre}
    data: {train: train.jsonl}
    train: {epochs: 1, micro_batch_size: 4}
"""


def edit(old: str, new: str) -> str:
    """BASE with `old` (which must occur exactly once) replaced by `new`."""
    assert BASE.count(old) == 1, f"test bug: {old!r} occurs {BASE.count(old)} times in BASE"
    return BASE.replace(old, new)


@dataclass(frozen=True)
class Case:
    text: str
    where: str  # the key path after `file:line` ("" when the error has none, e.g. invalid YAML)
    says: tuple[str, ...] = ()  # further fragments the message must contain: valid choices, the bad value …
    command: str = "validate"
    encoding: str = "utf-8"  # how the manifest is written (latin-1: not UTF-8)
    run_dir_flag: bool = True  # `run` passes --run-dir (False: the manifest's run.dir decides)


CLS_TRAIN = "    train: {epochs: 1, micro_batch_size: 4}\n"
PRE_TRAIN = "    train: {max_steps: 10, micro_batch_size: 4}\n"
PREPARE = "  - name: prep\n    kind: prepare\n    tokenizer: {from: tok}\n    data: {train: train.txt}\n"
CLM = """  - name: lm
    kind: clm
    init: {{config: {{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2}}}}
    tokenizer: {{from: tok}}
    data: {data}
    train: {{max_steps: 10, micro_batch_size: 4}}
"""

CASES: dict[str, Case] = {
    "unknown-top-level-key": Case(
        BASE + "stagez: []  #!\n", "stagez", ("unknown key", "valid keys here: version, run, defaults, evals, stages")),
    "unknown-key-in-train": Case(
        edit(CLS_TRAIN, "    train: {epochs: 1, micro_batch_size: 4, learning_rate: 0.1}  #!\n"),
        "stages[2].train.learning_rate", ("unknown key", "max_steps, epochs, micro_batch_size", "lr")),
    "unknown-key-in-sentencepiece": Case(
        edit("sentencepiece: {vocab_size: 100}", "sentencepiece: {vocab: 100}  #!"),
        "stages[0].sentencepiece.vocab", ("valid keys here: vocab_size, model_type",)),
    "training-section-on-tokenizer": Case(
        edit("    sentencepiece: {vocab_size: 100}\n",
             "    sentencepiece: {vocab_size: 100}\n    train: {max_steps: 3}  #!\n"),
        "stages[0].train", ("unknown key", "sentencepiece")),
    "unknown-kind": Case(
        edit("kind: classify", "kind: clasify  #!"), "stages[2].kind",
        ("unknown kind 'clasify'", VALID_KINDS)),
    "missing-kind": Case(
        edit("  - name: cls\n    kind: classify\n", "  - name: cls  #!\n"), "stages[2].kind",
        ("missing kind", VALID_KINDS)),
    "init-from-later-stage": Case(
        edit("    init:\n      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}\n",
             "    init: {from: cls}  #!\n"),
        "stages[1].init.from", ("'cls'", "comes later")),
    "init-from-itself": Case(
        edit("init: {from: pre}", "init: {from: cls}  #!"), "stages[2].init.from", ("'cls'", "comes later")),
    "init-from-missing-stage": Case(
        edit("init: {from: pre}", "init: {from: pretrain}  #!"), "stages[2].init.from",
        ("unknown earlier stage 'pretrain'", "known: tok, pre")),
    "init-from-tokenizer-stage": Case(
        edit("init: {from: pre}", "init: {from: tok}  #!"), "stages[2].init.from",
        ("'tok' is a tokenizer", "tokenizer.from")),
    "tokenizer-from-missing-stage": Case(
        edit("tokenizer: {from: tok}", "tokenizer: {from: spm}  #!"), "stages[1].tokenizer.from",
        ("unknown earlier stage 'spm'", "known: tok")),
    "duplicate-stage-name": Case(
        edit("  - name: cls\n", "  - name: pre  #!\n"), "stages[2].name", ("duplicate stage name 'pre'",)),
    "missing-data-file": Case(
        edit("data: {train: train.jsonl}", "data: {train: gone.jsonl}  #!"), "stages[2].data.train",
        ("not found", "gone.jsonl")),
    "missing-data-file-in-list": Case(
        edit("    data: {train: train.txt, eval: eval.txt}\n",
             "    data:\n      train:\n        - train.txt\n        - more.txt  #!\n      eval: eval.txt\n"),
        "stages[1].data.train[1]", ("not found", "more.txt")),
    "batch-arithmetic": Case(
        edit(CLS_TRAIN, "    train: {epochs: 1, micro_batch_size: 4, grad_accum: 2, global_batch_size: 10}  #!\n"),
        "stages[2].train.global_batch_size", ("10", "micro_batch_size 4", "grad_accum 2", "world size 2", "= 16")),
    "unknown-ds-config-name": Case(
        edit(CLS_TRAIN, "    deepspeed: {config: zero9}  #!\n" + CLS_TRAIN), "stages[2].deepspeed.config",
        ("zero9", f"shipped configs: {SHIPPED_DS}")),
    "both-max-steps-and-epochs": Case(
        edit(CLS_TRAIN, "    train: {epochs: 1, max_steps: 5, micro_batch_size: 4}  #!\n"), "stages[2].train",
        ("exactly one of: max_steps, epochs", "got max_steps, epochs")),
    "neither-max-steps-nor-epochs": Case(
        edit(CLS_TRAIN, "    train: {micro_batch_size: 4}  #!\n"), "stages[2].train",
        ("exactly one of: max_steps, epochs", "got none")),
    "invalid-yaml-syntax": Case(
        edit(CLS_TRAIN, CLS_TRAIN + "    eval: every_steps: 5  #!\n"), "", ("invalid YAML",)),
    "duplicate-yaml-key": Case(
        edit("    init: {from: pre}\n", "    init: {from: pre}\n    init: {from: tok}  #!\n"), "stages[2].init",
        ("duplicate key", "first at line 19")),
    "wrong-type-lr": Case(
        edit(CLS_TRAIN, '    train: {epochs: 1, micro_batch_size: 4, lr: "fast"}  #!\n'), "stages[2].train.lr",
        ("valid number",)),
    "negative-warmup": Case(
        edit(CLS_TRAIN, "    train: {epochs: 1, micro_batch_size: 4, warmup_steps: -5}  #!\n"),
        "stages[2].train.warmup_steps", ("greater than or equal to 0",)),
    "zero-nproc": Case(
        edit("launcher: {nproc_per_node: 2}", "launcher: {nproc_per_node: 0}  #!"),
        "defaults.launcher.nproc_per_node", ("greater than or equal to 1",)),
    "precision-not-in-set": Case(
        edit(CLS_TRAIN, "    precision: fp8  #!\n" + CLS_TRAIN), "stages[2].precision",
        ("'fp32', 'bf16' or 'fp16'", "fp8")),
    "version-not-1": Case(edit("version: 1", "version: 2  #!"), "version", ("Input should be 1", "got 2")),
    "init-with-two-sources": Case(
        edit("init: {from: pre}", "init: {from: pre, pretrained: bert-base-uncased}  #!"), "stages[2].init",
        ("exactly one of: from, pretrained, config", "got from, pretrained")),
    "init-config-without-model-type": Case(
        edit("    init:\n      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}\n",
             "    init: {config: {hidden_size: 32}}  #!\n"),
        "stages[1].init",
        ("model_type",)),
    "model-from-config-without-tokenizer": Case(
        edit("      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}\n    tokenizer: {from: tok}\n",
             "      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}  #!\n"),
        "stages[1].init.config", ("tokenizer.from or tokenizer.pretrained",)),
    "local-pretrained-folder-missing": Case(
        edit("init: {from: pre}", "init: {pretrained: ./my-bert}  #!"), "stages[2].init.pretrained",
        ("not found", "my-bert")),
    "format-not-inferable": Case(
        edit("data: {train: train.jsonl}", "data: {train: train.dat}  #!"), "stages[2].data",
        (".dat", "json, csv, parquet, text")),
    "format-mixed": Case(
        edit("data: {train: train.jsonl}", "data: {train: train.jsonl, eval: eval.txt}  #!"), "stages[2].data",
        (".jsonl, .txt", "json, csv, parquet, text")),
    "repeated-labels": Case(
        edit("data: {train: train.jsonl}", "data: {train: train.jsonl, labels: [plant, body, plant]}  #!"),
        "stages[2].data.labels", ("repeat",)),
    "run-name-with-slash": Case(edit("run: {name: bad}", "run: {name: a/b}  #!"), "run.name", ("pattern",)),
    "missing-run": Case(edit("run: {name: bad}\n", ""), "run", ("required",)),
    "empty-stage-list": Case("run: {name: bad}\nstages: []  #!\n", "stages", ("at least 1",)),
    "empty-file": Case("", "", ("empty",)),
    "only-comments": Case("# a manifest, some day\n", "", ("empty",)),
    "top-level-list": Case("- name: tok  #!\n- name: pre\n", "", ("mapping", "list")),
    "nnodes-2-on-run": Case(
        edit(CLS_TRAIN, "    launcher: {nnodes: 2}  #!\n" + CLS_TRAIN), "stages[2].launcher.nnodes",
        ("2 nodes", "Slurm"), command="run"),
    "unknown-kind-on-run": Case(
        edit("kind: classify", "kind: clasify  #!"), "stages[2].kind",
        (VALID_KINDS,), command="run"),
    "missing-data-file-on-run": Case(
        edit("data: {train: train.jsonl}", "data: {train: gone.jsonl}  #!"), "stages[2].data.train",
        ("not found",), command="run"),
    "batch-arithmetic-on-run": Case(
        edit(CLS_TRAIN, "    train: {epochs: 1, micro_batch_size: 4, global_batch_size: 4}  #!\n"),
        "stages[2].train.global_batch_size", ("= 8",), command="run"),
    # sbatch flags are checked when the manifest is read, not when a later stage is submitted
    "slurm-extra-flag-owned-by-baton": Case(
        edit(CLS_TRAIN, CLS_TRAIN + "    slurm:\n      extra: {requeue: null}  #!\n"),
        "stages[2].slurm.extra.requeue", ("set by baton",)),
    "slurm-extra-flag-not-a-name": Case(
        edit("launcher: {nproc_per_node: 2}\n", "launcher: {nproc_per_node: 2}\n  slurm:\n"
             "    extra: {\"mail type\": END}  #!\n"),
        "defaults.slurm.extra.mail type", ("not an sbatch long option name",)),
    "data-file-blank": Case(
        edit("    data: {train: train.txt}\n", "    data: {train: blank.txt}  #!\n"),
        "stages[0].data.train", ("blank.txt: empty",)),
    "data-file-not-utf8": Case(
        edit("    data: {train: train.txt}\n", "    data: {train: latin1.txt}  #!\n"),
        "stages[0].data.train", ("latin1.txt: line 2: not UTF-8",)),
    "data-file-broken-jsonl": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: broken.jsonl}  #!"),
        "stages[2].data.train", ("broken.jsonl: line 2: not JSON",)),
    "data-file-null-text": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: null-text.jsonl}  #!"),
        "stages[2].data.train", ("line 2: text is null, not a string",)),
    "data-file-no-text-column": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: train.jsonl, text_field: definition}  #!"),
        "stages[2].data.train", ("no field 'definition'", "set data.text_field")),
    "data-files-with-other-columns": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: train.jsonl, eval: other.jsonl}  #!"),
        "stages[2].data.train", ("different columns", "other.jsonl: label, source, text"), command="run"),
    "label-missing-in-row-6": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: labels-missing.jsonl}  #!"),
        "stages[2].data.train", ("labels-missing.jsonl: line 6: no field 'label'", "set data.label_field")),
    "label-null-in-row-5": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: labels-null.jsonl}  #!"),
        "stages[2].data.train", ("labels-null.jsonl: line 5: label is null",)),
    "label-a-float": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: labels-float.jsonl}  #!"),
        "stages[2].data.train", ("labels-float.jsonl: line 3: label is 1.5, not a string or an integer",)),
    "label-a-number-among-strings": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: labels-mixed.jsonl}  #!"),
        "stages[2].data.train", ("labels-mixed.jsonl: line 5: label is 3, a number, where",
                                 "line 1's is a string", "one label column holds one type")),
    "label-not-declared": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: labels-ab.jsonl, labels: [a]}  #!"),
        "stages[2].data.train", ("labels-ab.jsonl: line 2: label 'b' is not one of data.labels: a",)),
    "eval-label-not-in-train": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: labels-ab.jsonl, eval: labels-abc.jsonl}  #!"),
        "stages[2].data.eval", ("labels-abc.jsonl: line 3: label 'c' never occurs in the training data "
                                "(its labels: a, b)",)),
    "eval-label-not-declared": Case(
        edit("    data: {train: train.jsonl}",
             "    data: {train: labels-ab.jsonl, eval: labels-abc.jsonl, labels: [a, b]}  #!"),
        "stages[2].data.eval", ("labels-abc.jsonl: line 3: label 'c' is not one of data.labels: a, b",)),
    "infinite-lr": Case(
        edit(CLS_TRAIN, "    train: {epochs: 1, micro_batch_size: 4, lr: .inf}  #!\n"),
        "stages[2].train", ("lr: inf is not a finite number",)),
    "prepared-data-on-a-kind-that-reads-none": Case(
        edit("    data: {train: train.txt, eval: eval.txt}\n", "    data: {from: tok}  #!\n"),
        "stages[1].data.from", ("kind mlm does not read prepared data", "kinds that read a prepare stage's output: "
                                "clm")),
    "prepared-data-from-a-tokenizer-stage": Case(
        BASE + CLM.format(data="{from: tok}  #!"), "stages[3].data.from",
        ("stage 'tok' is a tokenizer stage and gives no prepared",)),
    "prepared-data-beside-files": Case(
        BASE + PREPARE + CLM.format(data="{from: prep, train: train.txt}  #!"), "stages[4].data.train",
        ("give no train, eval or hub beside it",)),
    "prepared-with-another-tokenizer": Case(
        BASE + PREPARE + "  - name: tok2\n    kind: tokenizer\n    data: {train: train.txt}\n"
        + CLM.format(data="{from: prep}  #!").replace("tokenizer: {from: tok}", "tokenizer: {from: tok2}"),
        "stages[5].data.from", ("stage 'prep' tokenized its corpus with stage 'tok's", "stage 'tok2's")),
}

# Known bugs: the message is clean and exit 2, but the location is wrong or missing.
# Each of these also runs through test_fails_cleanly below, which must pass.
CASES |= {
    "mlm-option-out-of-range": Case(
        edit("    train: {max_steps: 10", "    mlm: {mask_prob: 1.5}  #!\n    train: {max_steps: 10"),
        "stages[1].mlm.mask_prob", ("less than 1",)),
    "unknown-key-in-mlm-options": Case(
        edit("    train: {max_steps: 10", "    mlm: {mask: 0.2}  #!\n    train: {max_steps: 10"),
        "stages[1].mlm.mask", ("valid keys here: mask_prob",)),
    "nnodes-from-defaults-on-run": Case(
        edit("launcher: {nproc_per_node: 2}", "launcher: {nproc_per_node: 2, nnodes: 2}  #!"),
        "defaults.launcher.nnodes", ("2 nodes", "Slurm"), command="run"),
    "deepspeed-rejects-zero-stage-7": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {zero_optimization: {stage: 7}}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("DeepSpeed rejects", "stage", "7", "cls")),
    "deepspeed-rejects-zero-stage-7-on-run": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {zero_optimization: {stage: 7}}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("DeepSpeed rejects", "cls"), command="run"),
    "deepspeed-rejects-unknown-zero-key": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {zero_optimization: {bogus_knob: 1}}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("DeepSpeed rejects", "bogus_knob", "cls")),
    "ds-override-conflicts-with-manifest": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {train_batch_size: 999}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("train_batch_size", "999", "8")),
    "ds-template-value-conflicts-with-manifest": Case(
        edit(CLS_TRAIN, "    deepspeed: {config: ./custom.json}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("custom.json", "optimizer.params.lr", "0.1", "train.lr")),
}

def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BOMB = ", ".join(f"{b}: &{b} [{', '.join([f'*{a}' if a else 'lol'] * 9)}]"
                 for a, b in zip(["", "a", "b", "c", "d", "e", "f"], ["a", "b", "c", "d", "e", "f", "g"]))
TRAIN_WITH = "    train: {{epochs: 1, micro_batch_size: 4, {}}}  #!\n"

# Hostile or malformed input: each ends as a clean error too, never a traceback, a hang or silent acceptance.
CASES |= {
    "manifest-not-utf8": Case(edit("run: {name: bad}", "run: {name: bäd}  #!"), "", ("not UTF-8",),
                              encoding="latin-1"),
    "manifest-control-character": Case(edit("run: {name: bad}", "run: {name: b\x01ad}  #!"), "",
                                       ("control character", "\\x01")),
    "manifest-too-large": Case(BASE + "# " + "x" * (1 << 20) + "\n", "", ("larger than 1 MiB",)),
    "deeply-nested-lists": Case(
        edit(CLS_TRAIN, f"    deepspeed: {{overrides: {{x: {nested(10_000)}}}}}  #!\n" + CLS_TRAIN), "",
        ("nested more than 64 levels",)),
    "deeply-nested-lists-on-run": Case(
        edit(CLS_TRAIN, f"    deepspeed: {{overrides: {{x: {nested(10_000)}}}}}  #!\n" + CLS_TRAIN), "",
        ("nested more than 64 levels",), command="run"),
    "recursive-alias": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {x: &x [*x]}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed.overrides.x", ("nested more than 64 levels", "recursive alias")),
    "alias-bomb": Case(
        edit(CLS_TRAIN, f"    deepspeed: {{overrides: {{{BOMB}}}}}  #!\n" + CLS_TRAIN), "stages[2].deepspeed.overrides",
        ("more than 100,000 values", "alias")),
    "alias-bomb-on-run": Case(
        edit(CLS_TRAIN, f"    deepspeed: {{overrides: {{{BOMB}}}}}  #!\n" + CLS_TRAIN), "stages[2].deepspeed.overrides",
        ("more than 100,000 values",), command="run"),
    "merge-key-twice": Case(
        edit("  - name: cls\n", "  - name: cls\n    <<: {seed: 1}\n    <<: {seed: 2}  #!\n"), "stages[2].<<",
        ("duplicate key", "first at line 18")),
    "binary-value": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {x: !!binary aGVsbG8=}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed.overrides.x", ("unsupported YAML value",)),
    "ds-config-not-utf8": Case(
        edit(CLS_TRAIN, "    deepspeed: {config: ./latin1.json}  #!\n" + CLS_TRAIN), "stages[2].deepspeed.config",
        ("latin1.json:1", "not UTF-8")),
    "ds-top-level-key-misspelt": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {zero_optimizaton: {stage: 3}}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("zero_optimizaton: unknown DeepSpeed key", "did you mean zero_optimization?", "cls")),
    "ds-top-level-key-misspelt-on-run": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {zero_optimizaton: {stage: 3}}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("did you mean zero_optimization?",), command="run"),
    "ds-zero-key-misspelt": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {zero_optimization: {overlap_com: true}}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("zero_optimization.overlap_com", "did you mean overlap_comm?")),
    "run-dir-is-a-file": Case(
        edit("run: {name: bad}", "run: {name: bad, dir: train.txt}  #!"), "run.dir", ("train.txt is a file",),
        run_dir_flag=False),
    "stage-names-differ-only-in-case": Case(
        edit("  - name: cls\n", "  - name: PRE  #!\n"), "stages[2].name",
        ("stage name 'PRE' differs from 'pre' only in case", "case-insensitive")),
    "stage-name-starting-with-a-dash": Case(
        edit("  - name: cls\n", "  - name: -cls  #!\n"), "stages[2].name", ("pattern",)),
    "stage-name-blank": Case(edit("  - name: cls\n", "  - name: '  '  #!\n"), "stages[2].name", ("pattern",)),
    "run-name-starting-with-a-dash": Case(edit("run: {name: bad}", "run: {name: --help}  #!"), "run.name",
                                          ("pattern",)),
    "data-train-empty-list": Case(
        edit("    data: {train: train.jsonl}", "    data: {train: []}  #!"), "stages[2].data.train",
        ("no files",)),
    "ds-config-nan-in-optimizer-params": Case(
        edit(CLS_TRAIN, "    deepspeed: {config: ./nan.json}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("nan.json", "optimizer.params.momentum: NaN is not a finite number")),
    "ds-override-infinite": Case(
        edit(CLS_TRAIN, "    deepspeed: {overrides: {optimizer: {params: {momentum: .inf}}}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("optimizer.params.momentum: Infinity is not a finite number",)),
    "ds-nvme-offload-path-missing": Case(
        edit(CLS_TRAIN, "    deepspeed: {config: zero3, overrides: {zero_optimization: {offload_optimizer: "
                        "{device: nvme, nvme_path: /no/such/nvme}}}}  #!\n" + CLS_TRAIN),
        "stages[2].deepspeed", ("zero_optimization.offload_optimizer.nvme_path: /no/such/nvme: no such folder",)),
    "run-dir-is-a-file-on-run": Case(
        edit("run: {name: bad}", "run: {name: bad, dir: train.txt}  #!"), "run.dir", ("train.txt is a file",),
        command="run", run_dir_flag=False),
    "run-dir-below-a-file-on-run": Case(
        edit("run: {name: bad}", "run: {name: bad, dir: train.txt/run}  #!"), "run.dir", ("train.txt is a file",),
        command="run", run_dir_flag=False),
    "run-name-over-100-bytes": Case(edit("run: {name: bad}", f"run: {{name: {'é' * 60}}}  #!"), "run.name",
                                    ("120 bytes in UTF-8; at most 100",)),
    "stage-name-over-100-bytes": Case(edit("  - name: cls\n", f"  - name: {'é' * 100}  #!\n"), "stages[2].name",
                                      ("200 bytes in UTF-8; at most 100",)),
    "micro-batch-bool": Case(edit(CLS_TRAIN, "    train: {epochs: 1, micro_batch_size: true}  #!\n"),
                             "stages[2].train.micro_batch_size", ("valid integer", "got True")),
    "micro-batch-float": Case(edit(CLS_TRAIN, "    train: {epochs: 1, micro_batch_size: 1.0e+20}  #!\n"),
                              "stages[2].train.micro_batch_size", ("valid integer",)),
    "micro-batch-huge": Case(edit(CLS_TRAIN, "    train: {epochs: 1, micro_batch_size: 100000000}  #!\n"),
                             "stages[2].train.micro_batch_size", ("less than or equal to 65536",)),
    "nproc-huge": Case(edit("launcher: {nproc_per_node: 2}", "launcher: {nproc_per_node: 100000}  #!"),
                       "defaults.launcher.nproc_per_node", ("less than or equal to 1024",)),
    "nproc-bool": Case(edit("launcher: {nproc_per_node: 2}", "launcher: {nproc_per_node: true}  #!"),
                       "defaults.launcher.nproc_per_node", ("valid integer",)),
    "beta-one": Case(edit(CLS_TRAIN, TRAIN_WITH.format("betas: [0.9, 1.0]")), "stages[2].train.betas",
                     ("each must be at least 0 and less than 1",)),
    "beta-negative": Case(edit(CLS_TRAIN, TRAIN_WITH.format("betas: [-0.1, 0.999]")), "stages[2].train.betas",
                          ("each must be at least 0 and less than 1",)),
    "lr-bool": Case(edit(CLS_TRAIN, TRAIN_WITH.format("lr: true")), "stages[2].train.lr", ("not a boolean",)),
    "lr-nan": Case(edit(CLS_TRAIN, TRAIN_WITH.format("lr: .nan")), "stages[2].train.lr", ("greater than 0",)),
    "eps-nan": Case(edit(CLS_TRAIN, TRAIN_WITH.format("eps: .nan")), "stages[2].train.eps", ("greater than 0",)),
    "eps-inf": Case(edit(CLS_TRAIN, TRAIN_WITH.format("eps: .inf")), "stages[2].train", ("eps: inf is not a finite",)),
    "weight-decay-inf": Case(edit(CLS_TRAIN, TRAIN_WITH.format("weight_decay: .inf")), "stages[2].train",
                             ("weight_decay: inf is not a finite number",)),
    "seed-beyond-int64": Case(edit("  launcher: {nproc_per_node: 2}\n",
                                   "  launcher: {nproc_per_node: 2}\n  seed: 18446744073709551616  #!\n"),
                              "defaults.seed", ("less than or equal to 4294967295",)),
    "seed-negative": Case(edit(CLS_TRAIN, "    seed: -1  #!\n" + CLS_TRAIN), "stages[2].seed",
                          ("greater than or equal to 0",)),
}

# Curriculum sections (stages/runtime/curriculum.py): each mistake named at its key.
CUR = "    curriculum: {{{}}}  #!\n"
CLS_DATA = "    data: {train: train.jsonl}\n"
CASES |= {
    "curriculum-phases-out-of-order": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("phases: [{until_step: 4}, {until_step: 3}, {}]")),
        "stages[2].curriculum.phases[1].until_step", ("3 is not after the previous phase's until_step 4",)),
    "curriculum-last-phase-with-until-step": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("phases: [{until_step: 4}, {until_step: 9}]")),
        "stages[2].curriculum.phases[1].until_step", ("the last phase runs to the end", "leave out")),
    "curriculum-phase-without-until-step": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("phases: [{data_fraction: 0.5}, {}]")),
        "stages[2].curriculum.phases[0]", ("until_step is missing",)),
    "curriculum-fraction-above-1": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("phases: [{until_step: 4, data_fraction: 1.5}, {}]")),
        "stages[2].curriculum.phases[0].data_fraction", ("less than or equal to 1",)),
    "curriculum-fraction-zero": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("phases: [{until_step: 4, data_fraction: 0}, {}]")),
        "stages[2].curriculum.phases[0].data_fraction", ("greater than 0",)),
    "curriculum-max-length-over-data": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("phases: [{until_step: 4, max_length: 256}, {}]")),
        "stages[2].curriculum.phases[0].max_length", ("256 is more than data.max_length 128",)),
    "curriculum-phase-after-max-steps": Case(
        edit("    train: {max_steps: 10, micro_batch_size: 4}\n", "    train: {max_steps: 10, micro_batch_size: 4}\n"
             + CUR.format("phases: [{until_step: 10, data_fraction: 0.5}, {}]")),
        "stages[1].curriculum.phases[0].until_step", ("train.max_steps 10", "would never run")),
    "curriculum-easy-first-without-difficulty": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("order: easy_first, phases: [{until_step: 4, data_fraction: 0.5}, {}]")),
        "stages[2].curriculum.order", ("easy_first needs difficulty",)),
    "curriculum-difficulty-two-ways": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("order: easy_first, difficulty: {by: length, column: x}, "
                                               "phases: [{until_step: 4, data_fraction: 0.5}, {}]")),
        "stages[2].curriculum.difficulty", ("exactly one of: by, column",)),
    "curriculum-difficulty-column-missing": Case(
        edit(CLS_DATA + CLS_TRAIN, "    data: {train: train.jsonl}  #!\n" + CLS_TRAIN
             + "    curriculum: {order: easy_first, difficulty: {column: hard}, phases: [{until_step: 4, "
             "data_fraction: 0.5}, {}]}\n"),
        "stages[2].data.train", ("line 1: no field 'hard' for curriculum.difficulty.column",)),
    "curriculum-difficulty-column-in-text-file": Case(
        edit("    data: {train: train.txt, eval: eval.txt}\n", "    data: {train: train.txt, eval: eval.txt}  #!\n"
             "    curriculum: {order: easy_first, difficulty: {column: hard}, phases: [{until_step: 4, "
             "data_fraction: 0.5}, {}]}\n"),
        "stages[1].data.train", ("a text file has one column",)),
    "curriculum-loss-of-a-stage-that-scores-nothing": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("order: easy_first, difficulty: {loss_of: pre}, "
                                               "phases: [{until_step: 4, data_fraction: 0.5}, {}]")),
        "stages[2].curriculum.difficulty.loss_of",
        ("stage 'pre' is a mlm stage and gives no train_losses", "give stage 'pre' eval: {score_train: true}")),
    "curriculum-loss-of-itself": Case(
        edit(CLS_TRAIN, CLS_TRAIN + CUR.format("order: easy_first, difficulty: {loss_of: cls}, "
                                               "phases: [{until_step: 4, data_fraction: 0.5}, {}]")),
        "stages[2].curriculum.difficulty.loss_of", ("unknown earlier stage 'cls'",)),
    "curriculum-loss-of-other-training-data": Case(
        edit("    train: {max_steps: 10, micro_batch_size: 4}\n", "    train: {max_steps: 10, micro_batch_size: 4}\n"
             "    eval: {score_train: true}\n").replace(CLS_TRAIN, CLS_TRAIN + CUR.format(
                 "order: easy_first, difficulty: {loss_of: pre}, phases: [{until_step: 4, data_fraction: 0.5}, {}]")),
        "stages[2].curriculum.difficulty.loss_of",
        ("stage 'pre' scored its own training data (train.txt), but this stage trains on train.jsonl",)),
    "score-train-on-clm": Case(
        edit("kind: mlm", "kind: clm").replace("    train: {max_steps: 10, micro_batch_size: 4}\n",
                                             "    train: {max_steps: 10, micro_batch_size: 4}\n"
                                             "    eval: {score_train: true}  #!\n"),
        "stages[1].eval.score_train", ("kind clm does not score its training examples",)),
    "best-without-every-steps": Case(
        edit(PRE_TRAIN, PRE_TRAIN + "    eval: {best: {metric: eval_loss, mode: min}}  #!\n"),
        "stages[1].eval.best", ("needs evals during training: give eval.every_steps",)),
    "best-metric-the-stage-does-not-report": Case(
        edit(PRE_TRAIN, PRE_TRAIN + "    eval: {every_steps: 2, best: {metric: accuracy, mode: max}}  #!\n"),
        "stages[1].eval.best.metric", ("'accuracy' is not a metric of this stage", "known: eval_loss, perplexity")),
    "best-mode-neither-max-nor-min": Case(
        edit(PRE_TRAIN, PRE_TRAIN + "    eval: {every_steps: 2, best: {metric: eval_loss, mode: lowest}}  #!\n"),
        "stages[1].eval.best.mode", ("'max' or 'min'",)),
    "best-without-eval-data": Case(
        edit(CLS_TRAIN, CLS_TRAIN + "    eval: {every_steps: 2, best: {metric: accuracy, mode: max}}  #!\n"),
        "stages[2].eval.best", ("no eval data",)),
    "patience-without-best": Case(
        edit(PRE_TRAIN, PRE_TRAIN + "    eval: {every_steps: 2, patience: 3}  #!\n"),
        "stages[1].eval.patience", ("give eval.best",)),
    "best-with-score-train": Case(
        edit(PRE_TRAIN, PRE_TRAIN + "    eval: {every_steps: 2, score_train: true, "
             "best: {metric: eval_loss, mode: min}}  #!\n"),
        "stages[1].eval.score_train", ("eval.best hands on another",)),
    "curriculum-difficulty-on-clm": Case(
        edit("kind: mlm", "kind: clm").replace("    train: {max_steps: 10", CUR.format(
            "order: easy_first, difficulty: {by: length}, phases: [{until_step: 4, data_fraction: 0.5}, {}]")
            + "    train: {max_steps: 10"),
        "stages[1].curriculum.difficulty", ("packs documents into blocks", "order: random")),
}

# Models and tokenizers, looked at before launch (launcher/modelcheck.py): configs are built without weights,
# local folders (written by `write_model_folders`) must hold a model or a tokenizer.
PRE_INIT = "      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}\n"
PRE_DATA = "    data: {train: train.txt, eval: eval.txt}\n"
CLS_INIT = "    init: {from: pre}\n"
SMALL_PRE = edit(PRE_INIT, "      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2, "
                 "max_position_embeddings: 64}\n").replace(PRE_DATA, "    data: {train: train.txt, max_length: 64}\n")
CASES |= {
    "model-config-unknown-type": Case(
        edit(PRE_INIT, "      config: {model_type: bertt, hidden_size: 32, num_attention_heads: 2}  #!\n"),
        "stages[1].init.config.model_type", ("unknown model_type 'bertt'", "did you mean bert")),
    "model-config-heads-do-not-divide-hidden": Case(
        edit(PRE_INIT, "      config: {model_type: bert, hidden_size: 30, num_attention_heads: 4}  #!\n"),
        "stages[1].init.config", ("num_attention_heads 4 does not divide hidden_size 30",)),
    "model-config-heads-do-not-divide-hidden-on-run": Case(
        edit(PRE_INIT, "      config: {model_type: bert, hidden_size: 30, num_attention_heads: 4}  #!\n"),
        "stages[1].init.config", ("num_attention_heads 4 does not divide hidden_size 30",), command="run"),
    "model-config-gpt2-names": Case(
        edit(PRE_INIT, "      config: {model_type: gpt2, n_embd: 30, n_head: 4}  #!\n"),
        "stages[1].init.config", ("n_head 4 does not divide n_embd 30",)),
    "model-config-key-value-heads": Case(
        edit(PRE_INIT, "      config: {model_type: llama, hidden_size: 32, num_attention_heads: 4, "
             "num_key_value_heads: 3}  #!\n"),
        "stages[1].init.config", ("num_key_value_heads 3 does not divide num_attention_heads 4",)),
    "model-config-value-of-wrong-type": Case(
        edit(PRE_INIT, "      config: {model_type: bert, hidden_size: big, num_attention_heads: 2}  #!\n"),
        "stages[1].init.config.hidden_size", ("BertConfig refuses hidden_size", "expected int, got str")),
    "model-config-refused-by-its-class": Case(
        edit(PRE_INIT, "      config: {model_type: llama, hidden_size: 60, num_attention_heads: 8, "
             "head_dim: 16}  #!\n"),
        "stages[1].init.config", ("LlamaConfig refuses it", "hidden size (60) is not a multiple")),
    "max-length-over-positions": Case(
        edit(PRE_INIT + "    tokenizer: {from: tok}\n" + PRE_DATA,
             "      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2, max_position_embeddings: 128}\n"
             "    tokenizer: {from: tok}\n    data: {train: train.txt, max_length: 200}  #!\n"),
        "stages[1].data.max_length",
        ("200 but the model (init.config) has 128 position embeddings (max_position_embeddings)", "at most 128")),
    "max-length-default-over-upstream-positions": Case(
        SMALL_PRE.replace("    data: {train: train.jsonl}\n", "    data: {train: train.jsonl}  #!\n"),
        "stages[2].data.max_length",
        ("128 (the default) but the model (init: stage pre, built from stage pre's init.config) has 64 position",)),
    "pretrained-folder-without-config": Case(
        edit(CLS_INIT, "    init: {pretrained: ./no-config}  #!\n    tokenizer: {from: tok}\n"),
        "stages[2].init.pretrained", ("no-config holds no model: no config.json",)),
    "pretrained-folder-without-weights": Case(
        edit(CLS_INIT, "    init: {pretrained: ./no-weights}  #!\n    tokenizer: {from: tok}\n"),
        "stages[2].init.pretrained", ("no-weights holds no model weights: none of model.safetensors",)),
    "pretrained-folder-max-length-over-positions": Case(
        edit(CLS_INIT + "    data: {train: train.jsonl}\n", "    init: {pretrained: ./small-model}\n"
             "    tokenizer: {from: tok}\n    data: {train: train.jsonl, max_length: 512}  #!\n"),
        "stages[2].data.max_length", ("512 but the model (init folder", "small-model) has 64 position embeddings")),
    "pretrained-folder-without-its-tokenizer": Case(
        edit(CLS_INIT, "    init: {pretrained: ./model-only}  #!\n"), "stages[2].init.pretrained",
        ("model-only holds no tokenizer", "tokenizer defaults to this folder: give tokenizer.pretrained")),
    "tokenizer-folder-other-than-the-init-models-own": Case(
        edit(PRE_INIT + "    tokenizer: {from: tok}\n", "      pretrained: model-with-tok-a\n"
             "    tokenizer: {pretrained: tok-b}  #!\n"),
        "stages[1].tokenizer.pretrained", ("init (", "model-with-tok-a) and tokenizer (", "tok-b) hold different "
                                           "tokenizers",)),
    "distill-teacher-with-another-tokenizer": Case(
        BASE + "  - name: small\n    kind: distill\n    init: {config: {model_type: bert, hidden_size: 32, "
        "num_attention_heads: 2}}\n    tokenizer: {pretrained: tok-b}  #!\n"
        "    teacher: {pretrained: model-with-tok-a}\n    data: {train: train.jsonl, max_length: 64}\n"
        "    train: {max_steps: 2}\n    distill: {task: classify}\n",
        "stages[3].tokenizer.pretrained", ("teacher (", "and tokenizer (", "hold different tokenizers")),
    "tokenizer-folder-that-does-not-load": Case(
        edit("tokenizer: {from: tok}", "tokenizer: {pretrained: ./broken-tokenizer}  #!"),
        "stages[1].tokenizer.pretrained", ("broken-tokenizer does not load as a tokenizer",)),
    "tokenizer-folder-empty": Case(
        edit("tokenizer: {from: tok}", "tokenizer: {pretrained: ./no-config}  #!"),
        "stages[1].tokenizer.pretrained", ("no-config holds no tokenizer",)),
}

# Multitask stages (contract/kinds/multitask.py): each task's data is checked like a stage's data:, at its own key.
CLS_STAGE = "    kind: classify\n    init: {from: pre}\n    data: {train: train.jsonl}\n" + CLS_TRAIN
SENSE = "        - {name: sense, type: classify, weight: 1, data: {train: train.jsonl}}\n"
GLOSS = "        - {name: gloss, type: mlm, weight: 1, data: {train: train.txt}}\n"
MT_STAGE = ("    kind: multitask\n    init: {from: pre}\n    multitask:\n      mixing: weights\n      tasks:\n"
            + SENSE + GLOSS + "    train: {max_steps: 5, micro_batch_size: 4}\n")
MT = edit(CLS_STAGE, MT_STAGE)


def mt(old: str, new: str) -> str:
    assert MT.count(old) == 1, f"test bug: {old!r} occurs {MT.count(old)} times in MT"
    return MT.replace(old, new)


CASES |= {
    "multitask-duplicate-task-name": Case(
        mt(GLOSS, GLOSS.replace("gloss", "sense").rstrip() + "  #!\n"), "stages[2].multitask.tasks[1].name",
        ("duplicate task name 'sense'",)),
    "multitask-task-name-with-slash": Case(
        mt(GLOSS, GLOSS.replace("gloss", '"a/b"').rstrip() + "  #!\n"), "stages[2].multitask.tasks[1].name",
        ("pattern",)),
    "multitask-weights-sum-to-zero": Case(
        mt("      tasks:\n" + SENSE + GLOSS, "      tasks:  #!\n" + SENSE.replace("weight: 1", "weight: 0")
           + GLOSS.replace("weight: 1", "weight: 0")), "stages[2].multitask.tasks", ("sum to 0",)),
    "multitask-negative-weight": Case(
        mt(GLOSS, GLOSS.replace("weight: 1", "weight: -1").rstrip() + "  #!\n"),
        "stages[2].multitask.tasks[1].weight", ("greater than or equal to 0",)),
    "multitask-weight-missing": Case(
        mt(GLOSS, GLOSS.replace(" weight: 1,", "").rstrip() + "  #!\n"), "stages[2].multitask.tasks[1]",
        ("weight is missing", "mixing: weights")),
    "multitask-temperature-zero": Case(
        mt("      mixing: weights\n", "      mixing: temperature\n      temperature: 0  #!\n"),
        "stages[2].multitask.temperature", ("greater than 0",)),
    "multitask-weight-with-temperature": Case(
        mt("      mixing: weights\n      tasks:\n" + SENSE,
           "      mixing: temperature\n      tasks:\n" + SENSE.rstrip() + "  #!\n"),
        "stages[2].multitask.tasks[0].weight", ("weight is for mixing: weights",)),
    "multitask-negative-loss-weight": Case(
        mt(GLOSS, GLOSS.replace("weight: 1,", "weight: 1, loss_weight: -0.5,").rstrip() + "  #!\n"),
        "stages[2].multitask.tasks[1].loss_weight", ("greater than or equal to 0",)),
    "multitask-two-mlm-tasks": Case(
        mt(GLOSS, GLOSS + GLOSS.replace("gloss", "more").rstrip() + "  #!\n"), "stages[2].multitask.tasks[2].type",
        ("at most one mlm task",)),
    "multitask-task-data-file-missing": Case(
        mt(GLOSS, GLOSS.replace("train.txt", "gone.txt").rstrip() + "  #!\n"),
        "stages[2].multitask.tasks[1].data.train", ("data file not found", "gone.txt")),
    "multitask-task-data-file-broken": Case(
        mt(SENSE, SENSE.replace("train.jsonl", "broken.jsonl").rstrip() + "  #!\n"),
        "stages[2].multitask.tasks[0].data.train", ("broken.jsonl: line 2: not JSON",)),
    "multitask-task-data-file-missing-on-run": Case(
        mt(GLOSS, GLOSS.replace("train.txt", "gone.txt").rstrip() + "  #!\n"),
        "stages[2].multitask.tasks[1].data.train", ("data file not found",), command="run"),
    "multitask-stage-data-section": Case(
        mt("    multitask:\n", "    data: {train: train.jsonl}  #!\n    multitask:\n"), "stages[2].data",
        ("each task has its own: multitask.tasks[].data",)),
    "multitask-epochs": Case(
        mt("    train: {max_steps: 5, micro_batch_size: 4}\n", "    train: {epochs: 1, micro_batch_size: 4}  #!\n"),
        "stages[2].train.epochs", ("needs train.max_steps",)),
}


CUSTOM_DS = '{"zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}\n'


# prune (contract/kinds/prune.py)
PRUNE = "  - name: small\n    kind: prune\n    init: {from: cls}\n    data: {train: train.jsonl}\n"
CASES |= {
    "prune-nothing-to-cut": Case(BASE + PRUNE + "    prune: {task: classify}  #!\n", "stages[3].prune",
                                 ("nothing to prune: give ffn, heads or layers",)),
    "prune-ffn-above-1": Case(BASE + PRUNE + "    prune: {task: classify, ffn: 1.5}  #!\n", "stages[3].prune.ffn",
                              ("less than or equal to 1",)),
    "prune-init-from-config": Case(
        BASE + PRUNE.replace("init: {from: cls}", "init: {config: {model_type: bert}}  #!")
        + "    prune: {task: classify, ffn: 0.5}\n", "stages[3].init.config", ("nothing learnt to prune",)),
    "prune-init-from-a-tokenizer": Case(
        BASE + PRUNE.replace("init: {from: cls}", "init: {from: tok}  #!") + "    prune: {task: classify, ffn: 0.5}\n",
        "stages[3].init.from", ("stage 'tok' is a tokenizer stage and gives no model",)),
}

def write_inputs(folder: Path) -> None:
    """The small data files BASE refers to (a few real WordNet lines), plus a DeepSpeed JSON."""
    glosses = (WORDNET / "pretrain.txt").read_text(encoding="utf-8").splitlines()[:20]
    labelled = (WORDNET / "supersense_train.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    (folder / "train.txt").write_text("\n".join(glosses[:15]) + "\n", encoding="utf-8")
    (folder / "eval.txt").write_text("\n".join(glosses[15:]) + "\n", encoding="utf-8")
    (folder / "train.jsonl").write_text("\n".join(labelled) + "\n", encoding="utf-8")
    (folder / "train.dat").write_text("\n".join(labelled) + "\n", encoding="utf-8")
    (folder / "custom.json").write_text(CUSTOM_DS, encoding="utf-8")
    (folder / "nan.json").write_text('{"optimizer": {"type": "AdamW", "params": {"momentum": NaN}}}\n',
                                     encoding="utf-8")
    (folder / "latin1.json").write_text('{"zero_optimization": {"stage": 1}, "comment": "café"}\n', encoding="latin-1")
    # data files a stage would crash on minutes later; validate looks at their first rows
    (folder / "blank.txt").write_text("\n  \n", encoding="utf-8")
    (folder / "latin1.txt").write_text(glosses[0] + "\nun café\n", encoding="latin-1")
    (folder / "broken.jsonl").write_text(labelled[0] + "\n" + labelled[1][:-5] + "\n", encoding="utf-8")
    (folder / "null-text.jsonl").write_text(labelled[0] + '\n{"text": null, "label": "food"}\n', encoding="utf-8")
    (folder / "other.jsonl").write_text('{"text": "a grain", "label": "food", "source": "x"}\n', encoding="utf-8")
    rows = [f'{{"text": "gloss {n}", "label": "{"ab"[n % 2]}"}}' for n in range(8)]
    for name, row in {"missing": '{"text": "no label"}', "null": '{"text": "null label", "label": null}',
                      "mixed": '{"text": "numbered", "label": 3}'}.items():
        at = 5 if name == "missing" else 4  # 0-based: line 6 and line 5
        (folder / f"labels-{name}.jsonl").write_text("\n".join(rows[:at] + [row] + rows[at:]) + "\n", encoding="utf-8")
    (folder / "labels-float.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 2}\n'
                                               '{"text": "z", "label": 1.5}\n', encoding="utf-8")
    (folder / "labels-ab.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "labels-abc.jsonl").write_text("\n".join(rows[:2] + ['{"text": "c", "label": "c"}']) + "\n",
                                             encoding="utf-8")
    write_model_folders(folder)


TINY_CONFIG = ('{"model_type": "bert", "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1, '
               '"intermediate_size": 64, "max_position_embeddings": 64}\n')


def WORDPIECE(letters: str) -> dict[str, str]:  # noqa: N802  # a tokenizer folder's files, like a constant
    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters]) + "\n"
    return {"vocab.txt": vocab, "tokenizer_config.json": '{"tokenizer_class": "BertTokenizer"}'}


def write_model_folders(folder: Path) -> None:
    """Local folders that look like save_pretrained folders and are not: validate only looks at what they hold
    (the weights are never read, so a few bytes stand for them)."""
    for name, files in {
        "no-config": {"model.safetensors": "not read"},
        "no-weights": {"config.json": TINY_CONFIG.replace(', "max_position_embeddings": 64', "")},
        "small-model": {"config.json": TINY_CONFIG, "model.safetensors": "not read"},
        "model-only": {"config.json": TINY_CONFIG.replace(', "max_position_embeddings": 64', ""),
                       "model.safetensors": "not read"},
        "broken-tokenizer": {"tokenizer.json": "{not json", "tokenizer_config.json": "{}"},
        "tok-a": WORDPIECE("abcdefgh"),
        "tok-b": WORDPIECE("hgfedcba"),  # the same tokens, other ids
        "model-with-tok-a": {"config.json": TINY_CONFIG.replace(', "max_position_embeddings": 64', ""),
                             "model.safetensors": "not read", **WORDPIECE("abcdefgh")},
    }.items():
        (folder / name).mkdir(exist_ok=True)
        for file, text in files.items():
            (folder / name / file).write_text(text, encoding="utf-8")


def marked_line(text: str) -> int:
    """1-based line ending in `#!`; 1 when none is marked (errors about the whole file)."""
    return next((n for n, line in enumerate(text.splitlines(), 1) if line.rstrip().endswith("#!")), 1)


def baton(tmp_path: Path, case: Case) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """Write the case and run the CLI on it from tmp_path; return (process, manifest, run dir)."""
    write_inputs(tmp_path)
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(case.text, encoding=case.encoding)
    run_dir = tmp_path / "run"
    argv = [case.command, str(manifest)]
    if case.command == "run" and case.run_dir_flag:
        argv += ["--run-dir", str(run_dir)]
    return cli_in_process(argv, tmp_path), manifest, run_dir


def test_the_cli_process_exits_2_with_one_line(tmp_path: Path) -> None:
    """The cases run `main` in this process; here the real `python -m launcher.cli` meets one of them."""
    case = CASES["model-config-unknown-type"]
    write_inputs(tmp_path)
    (tmp_path / "bad.yaml").write_text(case.text)
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", str(tmp_path / "bad.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_clean_failure(proc, case, tmp_path, tmp_path / "run")


def assert_clean_failure(proc: subprocess.CompletedProcess[str], case: Case, tmp_path: Path, run_dir: Path) -> str:
    """Exit 2, one `baton: …` line holding every expected fragment, nothing launched; returns that line."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("baton: "), proc.stderr
    for fragment in case.says:
        assert fragment in lines[0], f"{fragment!r} missing from: {lines[0]}"
    assert proc.stdout == ""  # no plan printed, no stage started
    assert not (tmp_path / "runs").exists()  # the manifest's default run folder
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(run_dir.iterdir())
    return lines[0]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_rejected_with_location(tmp_path: Path, case: Case) -> None:
    proc, manifest, run_dir = baton(tmp_path, case)
    line = assert_clean_failure(proc, case, tmp_path, run_dir)
    location = f"{manifest}:{marked_line(case.text)}"
    assert line.startswith(f"baton: {location} {case.where}" if case.where else f"baton: {location} "), line


UNCLOSED_QUOTE = Case(edit("run: {name: bad}", 'run: {name: "bad}'), "", ("invalid YAML",))


def test_unclosed_quote_points_at_its_line(tmp_path: Path) -> None:
    proc, _, run_dir = baton(tmp_path, UNCLOSED_QUOTE)
    assert_clean_failure(proc, UNCLOSED_QUOTE, tmp_path, run_dir)
    proc, manifest, _ = baton(tmp_path, UNCLOSED_QUOTE)
    assert f"{manifest}:2 " in proc.stderr or "line 2" in proc.stderr, proc.stderr


def test_manifest_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = cli_in_process(["validate", str(missing)], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"baton: {missing}: cannot read"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    """Two independent mistakes give two lines, in file order (fix them all in one go)."""
    text = edit("init: {from: pre}", "init: {from: pretrain}").replace(
        "data: {train: train.txt, eval: eval.txt}", "data: {train: train.txt, eval: gone.txt}")
    proc, manifest, _ = baton(tmp_path, Case(text, ""))
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"baton: {manifest}:15 stages[1].data.eval: "), lines[0]
    assert lines[1].startswith(f"baton: {manifest}:19 stages[2].init.from: "), lines[1]


def test_bad_manifest_leaves_an_existing_run_untouched(tmp_path: Path) -> None:
    """Refused after the run's lock is taken (DeepSpeed's check comes last): the ledger is not rewritten."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = '{"version": 1, "stages": {}, "run": "bad", "note": "from an earlier run"}\n'
    (run_dir / "ledger.json").write_text(recorded)
    case = Case(edit(CLS_TRAIN, "    deepspeed: {overrides: {zero_optimization: {stage: 7}}}\n" + CLS_TRAIN), "",
                command="run")
    proc, _, _ = baton(tmp_path, case)
    assert proc.returncode == 2, proc.stderr
    assert "DeepSpeed rejects" in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["ledger.json"]  # no lock, manifest copy or stage folder
    assert (run_dir / "ledger.json").read_text() == recorded


MERGED = """\
version: 1
run: {name: bad}
defaults:
  launcher: {nproc_per_node: 2}
stages:
  - name: tok
    kind: tokenizer
    data: {train: train.txt}
    sentencepiece: {vocab_size: 100}
  - &pre
    name: pre
    kind: mlm
    init:
      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}
    tokenizer: {from: tok}
    data: {train: train.txt, eval: eval.txt}
    train: &train {max_steps: 10, micro_batch_size: 4, lr: 0.001}
  - <<: *pre
    name: pre2
    init: {from: pre}
    tokenizer: {from: pre}
    train: {<<: *train, max_steps: 20}
"""

EXPANDED = """\
version: 1
run: {name: bad}
defaults:
  launcher: {nproc_per_node: 2}
stages:
  - name: tok
    kind: tokenizer
    data: {train: train.txt}
    sentencepiece: {vocab_size: 100}
  - name: pre
    kind: mlm
    init:
      config: {model_type: bert, hidden_size: 32, num_attention_heads: 2}
    tokenizer: {from: tok}
    data: {train: train.txt, eval: eval.txt}
    train: {max_steps: 10, micro_batch_size: 4, lr: 0.001}
  - name: pre2
    kind: mlm
    init: {from: pre}
    tokenizer: {from: pre}
    data: {train: train.txt, eval: eval.txt}
    train: {max_steps: 20, micro_batch_size: 4, lr: 0.001}
"""


def test_merge_keys_resolve_like_their_expanded_form(tmp_path: Path) -> None:
    """`<<: *anchor` merges as YAML says (written keys win); it is no duplicate key."""
    from launcher.manifest import load
    from launcher.resolve import resolve

    write_inputs(tmp_path)
    (tmp_path / "merged.yaml").write_text(MERGED, encoding="utf-8")
    (tmp_path / "expanded.yaml").write_text(EXPANDED, encoding="utf-8")
    merged, expanded = load(tmp_path / "merged.yaml"), load(tmp_path / "expanded.yaml")
    assert merged.manifest == expanded.manifest
    assert [r.base for r in resolve(merged)] == [r.base for r in resolve(expanded)]
    assert merged.lines[("stages", 2, "kind")] == 18  # a merged key points at its `<<` line
    assert merged.lines[("stages", 2, "train", "micro_batch_size")] == 22
    proc = cli_in_process(["validate", str(tmp_path / "merged.yaml")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 stage(s): tok [tokenizer], pre [mlm], pre2 [mlm]" in proc.stdout


LEDGERS: dict[str, tuple[bytes, str]] = {
    "list": (b"[]\n", "a JSON object is expected, got list"),
    "null": (b"null\n", "a JSON object is expected, got null"),
    "no-stages": (b'{"version": 1}\n', "stages: missing"),
    "stages-a-list": (b'{"version": 1, "stages": []}\n', "stages: a JSON object is expected"),
    "bad-state": (b'{"version": 1, "stages": {"pre": {"state": "finished", "attempts": []}}}\n',
                  "stages.pre.state: 'finished' is not one of"),
    "output-without-digest": (b'{"version": 1, "stages": {"pre": {"state": "done", "attempts": [], "output": {}}}}\n',
                              "stages.pre.output.digest"),
    "random-bytes": (bytes(range(256)) * 4, "unreadable ledger: not UTF-8"),
    "truncated": (b'{"version": 1, "stages": {', "unreadable ledger"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "unreadable ledger"),
    "other-version": (b'{"version": 7, "stages": {}}\n', "ledger version 7"),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("name", LEDGERS)
def test_bad_ledger_refused(tmp_path: Path, name: str, dry_run: bool) -> None:
    """A ledger baton cannot plan from is named and left as it is; nothing else is written."""
    content, says = LEDGERS[name]
    write_inputs(tmp_path)
    manifest = tmp_path / "ok.yaml"
    manifest.write_text(BASE, encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ledger.json").write_bytes(content)
    proc = cli_in_process(["run", str(manifest), "--run-dir", str(run_dir)] + (["--dry-run"] if dry_run else []),
                          tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"baton: {run_dir / 'ledger.json'}: "), proc.stderr
    assert says in lines[0], lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["ledger.json"]
    assert (run_dir / "ledger.json").read_bytes() == content


def test_run_dir_flag_naming_a_file(tmp_path: Path) -> None:
    write_inputs(tmp_path)
    manifest = tmp_path / "ok.yaml"
    manifest.write_text(BASE, encoding="utf-8")
    proc = cli_in_process(["run", str(manifest), "--run-dir", str(tmp_path / "train.txt")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"baton: {tmp_path / 'train.txt'}: not a run folder"), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_model_checks_that_passed_are_remembered(tmp_path: Path) -> None:
    """A config or folder that passed is not looked at again (launcher/modelcheck.py): resolving an unchanged
    manifest imports neither transformers nor torch, so `baton run` with nothing to do stays quick."""
    write_inputs(tmp_path)
    manifest = tmp_path / "ok.yaml"
    manifest.write_text(edit(CLS_INIT, "    init: {pretrained: ./small-model}\n    tokenizer: {from: tok}\n"
                             ).replace("    data: {train: train.jsonl}\n", "    data: {train: train.jsonl, "
                                       "max_length: 64}\n"), encoding="utf-8")
    code = ("import sys; from pathlib import Path; from launcher.manifest import load; "
            "from launcher.resolve import resolve; resolve(load(Path(sys.argv[1]))); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {**os.environ, "BATON_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    runs = [subprocess.run([sys.executable, "-c", code, str(manifest)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    assert [r.stdout.strip() for r in runs] == ["['torch', 'transformers']", "[]"], [r.stderr for r in runs]
    assert len(list((tmp_path / "cache" / "modelcheck").iterdir())) == 2  # pre's config, cls's folder


# ----------------------------------------------------------------- run.report_to (TensorBoard, W&B, MLflow)

REPORT_TO = "run: {name: bad}"


def without(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment in which `module` cannot be imported (a sitecustomize blocks it), as where it is not
    installed."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n", encoding="utf-8")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)])}


@pytest.mark.parametrize("command", ["validate", "run"])
def test_report_to_a_tracker_not_installed(tmp_path: Path, command: str) -> None:
    """report_to: [wandb] where wandb cannot be imported: exit 2 naming file:line and the list item, nothing run."""
    write_inputs(tmp_path)
    text = edit(REPORT_TO, "run:\n  name: bad\n  report_to: [tensorboard, wandb]  #!")
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", command, str(manifest)], cwd=tmp_path,
                          env=without(tmp_path, "wandb"), capture_output=True, text=True, timeout=120)
    case = Case(text, "run.report_to[1]", ("wandb is not installed", "baton[wandb]"), command=command)
    line = assert_clean_failure(proc, case, tmp_path, tmp_path / "run")
    assert line.startswith(f"baton: {manifest}:{marked_line(text)} run.report_to[1]: "), line
    # installed (this test environment has both): the same manifest is fine
    ok = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", str(manifest)], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr


def test_report_to_unknown_tracker_and_settings(tmp_path: Path) -> None:
    for text, where, says in (
        (edit(REPORT_TO, "run:\n  name: bad\n  report_to: [tensorboard, comet]  #!"), "run.report_to[1]",
         ("'tensorboard', 'wandb' or 'mlflow'", "got 'comet'")),
        (edit(REPORT_TO, "run:\n  name: bad\n  wandb: {project: p, team: t}  #!"), "run.wandb.team",
         ("unknown key; valid keys here: project, entity",)),
        (edit(REPORT_TO, "run:\n  name: bad\n  mlflow: {experiment: 3}  #!"), "run.mlflow.experiment",
         ("got 3",)),
        (edit(REPORT_TO, "run:\n  name: bad\n  report_to: [tensorboard, tensorboard]  #!"), "run.report_to",
         ("tensorboard named twice",)),
    ):
        proc, manifest, run_dir = baton(tmp_path, Case(text, where, says))
        line = assert_clean_failure(proc, Case(text, where, says), tmp_path, run_dir)
        assert line.startswith(f"baton: {manifest}:{marked_line(text)} {where}: "), line


def test_a_huge_variants_grid_is_refused_by_its_size_not_expanded(tmp_path: Path) -> None:
    """8 keys × 10 values is 10^8 variants: refused from the product of the sizes, within a memory limit (1 GiB of
    address space) that expanding the grid would run through in a moment."""
    grid = ", ".join(f"train.k{k}: [{', '.join(str(v) for v in range(10))}]" for k in range(8))
    case = Case(edit(CLS_TRAIN, CLS_TRAIN + f"    variants: {{grid: {{{grid}}}, select: {{max: accuracy}}}}  #!\n"),
                "stages[2].variants", ("100000000 variants; at most 64",))
    write_inputs(tmp_path)
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(case.text)
    limited = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
               "from launcher.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", limited, "validate", str(manifest)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(REPO)})
    line = assert_clean_failure(proc, case, tmp_path, tmp_path / "run")
    assert line.startswith(f"baton: {manifest}:{marked_line(case.text)} stages[2].variants"), line


def test_a_manifest_that_is_not_a_regular_file_is_refused_not_read(tmp_path: Path) -> None:
    """A FIFO would block the reader until something writes to it: refused before it is opened."""
    fifo = tmp_path / "manifest.yaml"
    os.mkfifo(fifo)
    for command in ("validate", "run"):
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", command, str(fifo)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env=os.environ | {"PYTHONPATH": str(REPO)})
        assert proc.returncode == 2 and proc.stderr == f"baton: {fifo}: not a regular file (a FIFO); a manifest is " \
                                                       "a YAML file\n", proc.stderr


def test_offline_hub_names_not_in_the_cache_are_refused(tmp_path: Path) -> None:
    """With HF_HUB_OFFLINE=1 a hub model or dataset that is not in the local cache cannot be loaded by the stage:
    refused by validate, naming each; one that is in the cache passes."""
    write_inputs(tmp_path)
    manifest = tmp_path / "offline.yaml"
    manifest.write_text(edit("init: {from: pre}", "init: {pretrained: acme/tiny-bert}  #!")
                        .replace("    data: {train: train.txt, eval: eval.txt}\n",
                                 "    data: {hub: acme/glosses}\n"))
    hf = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env |= {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    def validate() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "launcher.cli", "validate", str(manifest)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env=env)

    proc = validate()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [
        f"baton: {manifest}:15 stages[1].data.hub: 'acme/glosses': not in the local Hugging Face cache "
        f"({hf / 'hub'}), and HF_HUB_OFFLINE=1 forbids downloading it; fetch it once without it, or give local files",
        f"baton: {manifest}:{marked_line(manifest.read_text())} stages[2].init.pretrained: 'acme/tiny-bert': not in "
        f"the local Hugging Face cache ({hf / 'hub'}), and HF_HUB_OFFLINE=1 forbids downloading it; fetch it once "
        "without it, or give a local folder"], proc.stderr
    for kind, name in (("models", "acme--tiny-bert"), ("datasets", "acme--glosses")):
        (hf / "hub" / f"{kind}--{name}" / "snapshots" / "0123abc").mkdir(parents=True)
    proc = validate()
    assert "not in the local Hugging Face cache" not in proc.stderr, proc.stderr
