"""Tokenizers and models from the spec's input references, with their digests verified first."""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from contract.files import digest as digest_of
from stages.runtime import engine
from stages.runtime.spec import Ref, Spec, SpecError


def verify_digest(key: str, path: str | None, expected: str | None) -> None:
    """Exit-2 error when a local input differs from what the launcher recorded (e.g. rebuilt upstream)."""
    if expected is None or path is None:
        return
    if not os.path.exists(path):
        raise SpecError(f"{key}.path: {path}: does not exist")
    actual = digest_of(path)
    if actual != expected:
        raise SpecError(f"{key}.digest: {path} has {actual}, spec expects {expected}")


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
    return tok


def build_model(spec: Spec, auto_class, tokenizer, *, resume: bool, name: str = "init", **overrides: Any):
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
                model = auto_class.from_pretrained(init.path, **overrides)
        except OSError as e:
            raise SpecError(f"{key}.path: {init.path}: cannot load a model: {e}") from None
    if len(tokenizer) > model.config.vocab_size:
        raise SpecError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{model.config.vocab_size}")
    return model


def seed_dropout(spec: Spec, rank: int) -> None:
    """Per-rank stream for dropout after identical construction; checkpoints save and restore it."""
    torch.manual_seed(spec.seed + 1_000_003 * (rank + 1))
    random.seed(spec.seed + rank)
