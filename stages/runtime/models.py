"""Tokenizers and models from the spec's input references, with their digests verified first.

Two checks guard a model continued from a checkpoint (init from an earlier stage or a pretrained folder):

- the tokenizer must be the model's own (`check_vocabulary`): its embedding rows are indexed by the ids of the
  tokenizer it was trained with, and another tokenizer, even one of the same size, would silently feed it other
  tokens. Vocabulary extension is refused, not attempted.
- the checkpoint must hold the model's body (`report_loading`): weights it lacks outside a head are an error
  (an unrelated checkpoint), a head it lacks (all-MiniLM-L6-v2 has no masked-LM head; a classifier is always new)
  is reported on the terminal and recorded in metrics.jsonl as an "init" record.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from contract.files import digest as digest_of
from contract.layout import ChangedInput
from contract.spec import SPECIAL_TOKEN_IDS
from stages.runtime import dist, engine, records
from stages.runtime.spec import Ref, Spec, SpecError, TrainingSpec


class InputChanged(SpecError):
    """An input's content is not what the launcher recorded: exit 2, and error.json names the input (`changed`), so
    that the launcher can record an upstream stage's final/ as damaged."""

    def __init__(self, changed: ChangedInput) -> None:
        self.changed = changed
        super().__init__(f"{changed.key}.digest: {changed.path} has {changed.digest}, spec expects {changed.expected}")


def verify_digest(key: str, path: str | None, expected: str | None) -> None:
    """Exit-2 error when a local input differs from what the launcher recorded (e.g. rebuilt upstream)."""
    if expected is None or path is None:
        return
    if not os.path.exists(path):
        raise SpecError(f"{key}.path: {path}: does not exist")
    actual = digest_of(path)
    if actual != expected:
        raise InputChanged(ChangedInput(key=key, path=path, digest=actual, expected=expected))


def load_tokenizer(spec: Spec, name: str = "tokenizer"):
    """The tokenizer of input `name`."""
    from transformers import AutoTokenizer

    ref = spec.ref(name)
    key = f"inputs.{name}"
    if ref.path is None:
        raise SpecError(f"{key}.path: missing (source {ref.source} cannot give a tokenizer)")
    verify_digest(key, ref.path, ref.digest)
    try:
        tok = AutoTokenizer.from_pretrained(ref.path)
    except (OSError, ValueError) as e:
        raise SpecError(f"{key}.path: {ref.path}: cannot load a tokenizer: {e}") from None
    if tok.pad_token_id is None:
        raise SpecError(f"{key}.path: {ref.path}: the tokenizer has no pad token")
    # transformers saves how it was loaded (offline or not) into tokenizer_config.json; the same
    # tokenizer must give the same final/ digest wherever the stage ran
    tok.init_kwargs.pop("local_files_only", None)
    if name == "tokenizer":
        check_vocabulary(spec, tok)
    return tok



def check_vocabulary(spec: Spec, tokenizer) -> None:
    """Exit-2 error when a model continued from a checkpoint (inputs.init from a stage or a folder) is given
    another tokenizer than the one saved with it: other ids for the same tokens, fewer or more tokens. Called
    before any data work. Where the init folder holds no tokenizer there is nothing to compare with."""
    from transformers import AutoTokenizer

    init = spec.inputs.get("init")
    ref = spec.ref("tokenizer")
    if not isinstance(init, Ref) or init.source == "config" or init.path is None or init.path == ref.path:
        return
    try:
        own = AutoTokenizer.from_pretrained(init.path)
    except (OSError, ValueError, TypeError):
        return  # a folder with weights only: the model's vocab_size is checked in build_model
    why = vocabulary_difference(own, tokenizer)
    if why is None:
        return
    raise SpecError(f"inputs.tokenizer: {ref.path} is not the tokenizer of inputs.init {init.path}: {why}. "
                    "Leave tokenizer: out to use the init model's own")


def vocabulary_difference(own, tokenizer) -> str | None:
    """How `tokenizer` differs from `own`, a model's own tokenizer (None: the same tokens, ids and special tokens),
    as the end of a sentence about `tokenizer` ("it …")."""
    theirs, ours = own.get_vocab(), tokenizer.get_vocab()
    specials = [n.removesuffix("_id") for n in SPECIAL_TOKEN_IDS
                if getattr(own, n, None) != getattr(tokenizer, n, None)]
    if theirs == ours and not specials:
        return None
    moved = sum(1 for token, i in theirs.items() if ours.get(token) != i)
    if moved == 0 and len(ours) > len(theirs):
        return (f"it adds {len(ours) - len(theirs)} tokens to the model's {len(theirs)}, and vocabulary extension "
                "(new embedding rows) is not supported")
    if moved:
        return (f"{moved} of the model's {len(theirs)} tokens have another id in it ({len(ours)} tokens); the "
                "model's embedding rows would be fed other tokens than they were trained on")
    return f"its special tokens differ ({', '.join(specials) or 'vocabulary'})"


def parameter_count(model) -> int:
    """Parameters of `model`, tied ones once, ZeRO-3 partitions counted whole."""
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in {id(p): p for p in model.parameters()}.values())


def build_model(spec: TrainingSpec, auto_class, tokenizer, *, resume: bool, name: str = "init", **overrides: Any):
    """The model of input `name` (the one to train). On resume only the architecture is built:
    the checkpoint brings the weights."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per rank per load, in every stage log
    init: Ref = spec.ref(name)
    key = f"inputs.{name}"
    engine.prepare_model_construction(spec)
    # Same seed on every rank: ZeRO-1/2 need identical initial replicas.
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    if init.source == "config":
        if not init.config or "model_type" not in init.config:
            raise SpecError(f"{key}.config: needs at least model_type for source=config")
        from_tok = {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        }
        kwargs = {k: v for k, v in from_tok.items() if v is not None} | init.config | overrides
        config = AutoConfig.for_model(**kwargs)
        model = auto_class.from_config(config)
    else:
        if init.path is None:
            raise SpecError(f"{key}.path: missing for source={init.source}")
        if not resume:
            verify_digest(key, init.path, init.digest)
        try:
            if resume:
                model = auto_class.from_config(AutoConfig.from_pretrained(init.path, **overrides))
            else:
                model, info = auto_class.from_pretrained(init.path, output_loading_info=True, **overrides)
        except OSError as e:
            raise SpecError(f"{key}.path: {init.path}: cannot load a model: {e}") from None
        if not resume:
            report_loading(spec, model, info, key, init.path)
    if len(tokenizer) > model.config.vocab_size:
        raise SpecError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{model.config.vocab_size}")
    return model


def report_loading(spec: Spec, model, info: dict[str, Any], key: str, path: str, shown: int = 12) -> None:
    """What `from_pretrained` did not find in the checkpoint, by transformers' loading info: exit 2 when the model's
    body (its base model, e.g. `bert.*`) lacks weights, a terminal line naming the newly initialised head otherwise.
    Every load is recorded in metrics.jsonl as an "init" record (rank 0), before the stage's "start" record.

    A base model's pooler counts as head: masked-LM checkpoints of the BERT family have none, and a classifier
    built on them gets a new one."""
    params = dict(model.named_parameters())
    new = sorted(k for k in info.get("missing_keys", ()) if k in params)  # buffers are made, not learned
    unused = sorted(info.get("unexpected_keys", ()))
    base, prefix = model.base_model, model.base_model_prefix
    body = set(params) if base is model else {f"{prefix}.{n}" for n, _ in base.named_parameters()}
    lacking = [k for k in new if k in body and "pooler" not in k.split(".")]
    cls = type(model).__name__
    if lacking:
        raise SpecError(
            f"{key}.path: {path} lacks {len(lacking)} of the {len(body)} weights of the body of {cls} "
            f"({_names(lacking, 3)}){f' and holds {len(unused)} it does not use' if unused else ''}: it is "
            "not a checkpoint of this model (they would start random). Use a checkpoint of this architecture, "
            "or init.config to build from scratch"
        )
    values = sum(_numel(params[k]) for k in new)
    if new:
        dist.print0(f"{spec.stage}: not in the checkpoint, newly initialised (random): {_names(new, shown)} "
                    f"({len(new)} tensors, {values:,} values; the rest of {cls} loaded from {path})")
    records.log("init", source=path, model=cls, newly_initialized=new, newly_initialized_values=values,
                unused=unused)


def _names(keys: list[str], shown: int) -> str:
    return ", ".join(keys[:shown]) + (f" … and {len(keys) - shown} more" if len(keys) > shown else "")


def _numel(param) -> int:
    return int(getattr(param, "ds_numel", None) or param.numel())  # ZeRO-3 partitions: the full size


def seed_dropout(spec: Spec, rank: int) -> None:
    """Per-rank stream for dropout after identical construction; checkpoints save and restore it."""
    torch.manual_seed(spec.seed + 1_000_003 * (rank + 1))
    random.seed(spec.seed + rank)
