"""A look at the models and tokenizers a stage will load, before anything launches.

What a stage would otherwise meet after launch as a crash under torchrun: a `config:` that transformers'
config class refuses (an unknown model_type, a value of the wrong type, attention heads that do not divide
the hidden size), a local folder with no model or no tokenizer in it, examples longer than the model's
position embeddings. Only what is cheap: configs are built without weights, a folder's weights are looked
for, not read; tokenizers load (they are small). Local folders only: a hub name is never looked up.

transformers, and with it torch (2.5 s), is imported by the first check that needs it, never at module level,
and once per process. A check that passed is remembered (`launcher.verdicts`: a small JSON file per config or
folder digest in ~/.cache/baton/modelcheck, or $BATON_CACHE_DIR) for the same transformers and the same version of this
file, so an unchanged manifest (`baton run` with nothing to do) imports neither. Failures are not remembered.
Messages name no place in the manifest: the caller (`resolve`) prefixes `file:line key.path`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from contract.spec import vocabulary
from launcher import verdicts

Problem = tuple[tuple[str, ...], str]  # (key path below the reference's config, or (), message)
Positions = tuple[str, int]  # (the config's name for it, the number) of a model's position embeddings

# where a config may keep its number of positions (GPT-2: n_positions, behind attribute_map)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# what a tokenizer folder holds at least one of (tokenizer.json, tokenizer_config.json, vocab.txt, spiece.model …)
TOKENIZER_FILES = ("tokenizer*.json", "vocab*", "*.model", "merges.txt", "*.tiktoken")


# ----------------------------------------------------------------- models


def config(values: dict[str, Any]) -> tuple[Positions | None, list[Problem]]:
    """`AutoConfig.for_model(**values)`, as the stage builds it (without the vocabulary it takes from the
    tokenizer): (its positions, problems)."""
    found, problems = _remembered("config", values, lambda: _config(values))
    return (None, list(problems)) if problems else (found, [])


def _config(values: dict[str, Any]) -> tuple[Positions | None, list[Problem]]:
    with _quiet() as transformers:
        from huggingface_hub.errors import StrictDataclassFieldValidationError
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = values.get("model_type")
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type).lower(), list(CONFIG_MAPPING.keys()), n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "e.g. bert, roberta, gpt2, llama, qwen2"
            return None, [(("model_type",), f"unknown model_type {model_type!r} to transformers "
                                            f"{transformers.__version__}; {hint}")]
        cls = CONFIG_MAPPING[model_type]
        try:
            built = transformers.AutoConfig.for_model(**values)
        except StrictDataclassFieldValidationError as e:
            found = re.search(r"field '([^']+)'", str(e))
            field = found[1] if found else ""
            return None, [((field,) if field in values else (), f"{cls.__name__} refuses {field or 'it'}: "
                                                                 f"{_one_line(e.__cause__ or e)}")]
        except Exception as e:  # the config classes raise what they like (ValueError, TypeError, …)
            return None, [((), f"{cls.__name__} refuses it: {_one_line(e.__cause__ or e)}")]
    return positions(built), [((), p) for p in _architecture(built)]


def _architecture(config: Any) -> list[str]:
    """Shapes the model classes refuse only when they are built (after launch): attention heads that do not
    divide the hidden size (where no head_dim is given), key-value heads that do not divide the heads."""
    names = getattr(config, "attribute_map", None) or {}

    def name(key: str) -> str:  # as the config spells it (GPT-2: n_head, n_embd)
        return str(names.get(key, key))

    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    problems = []
    if isinstance(heads, int) and heads < 1:
        problems.append(f"{name('num_attention_heads')} {heads}: at least 1 is needed")
    elif (isinstance(heads, int) and isinstance(hidden, int) and hidden % heads
          and getattr(config, "head_dim", None) is None and not hasattr(config, "embedding_size")):
        problems.append(f"{name('num_attention_heads')} {heads} does not divide {name('hidden_size')} {hidden}")
    if isinstance(heads, int) and heads >= 1 and isinstance(kv, int) and (kv < 1 or heads % kv):
        problems.append(f"{name('num_key_value_heads')} {kv} does not divide {name('num_attention_heads')} {heads}")
    return problems


@functools.cache
def model_folder(path: str, digest: str) -> tuple[Positions | None, tuple[str, ...]]:
    """A local folder the stage loads with `from_pretrained` (its files' `digest`): (its positions, problems)."""
    found, problems = _remembered("model folder", [path, digest], lambda: _model_folder(path))
    return found, tuple(problems or ())


def _model_folder(path: str) -> tuple[Positions | None, tuple[str, ...]]:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return None, (f"{path} holds no model: no config.json (a save_pretrained folder holds config.json and "
                      "model.safetensors)",)
    with _quiet() as transformers:
        try:
            built = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:
            return None, (f"{folder / 'config.json'} does not load as a model config: {_one_line(e)}",)
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if not any((folder / n).is_file() for n in names):
        return positions(built), (f"{path} holds no model weights: none of {', '.join(names)}",)
    return positions(built), ()


def positions(config: Any) -> Positions | None:
    """A model's position embeddings; None where its config states none (relative positions, T5)."""
    names = getattr(config, "attribute_map", None) or {}
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return str(names.get(key, key)), value
    return None


def too_long(length: int, default: bool, found: Positions | None, model: str) -> str | None:
    """Why `length` tokens per example (data.max_length; `default`: not written) do not fit the model."""
    if found is None or length <= found[1]:
        return None
    key, limit = found
    return (f"{length}{' (the default)' if default else ''} but the model ({model}) has {limit} position "
            f"embeddings ({key}); set data.max_length to at most {limit}")


def max_length_applies(options: dict[str, Any]) -> bool:
    """Whether data.max_length caps a stage's examples: not where the kind packs documents into blocks of its
    own `block_size` (clm), which its stage checks against the positions itself."""
    return "block_size" not in options


# ----------------------------------------------------------------- adapters


def quantize_problem() -> str:
    """Why QLoRA (a 4-bit base through bitsandbytes) cannot run here: it needs a CUDA device and bitsandbytes."""
    with _quiet() as transformers:
        from transformers.utils import is_bitsandbytes_available, is_torch_cuda_available

        if not is_torch_cuda_available():
            return (f"QLoRA (quantize: 4bit) needs a CUDA device, and torch {transformers.utils.get_torch_version()} "
                    "sees none here; leave quantize out to train the adapter on the base model as it is")
        if not is_bitsandbytes_available():
            return "QLoRA (quantize: 4bit) needs bitsandbytes, which is not installed: pip install bitsandbytes"
    # The 4-bit base's load, training and merge (dequantised) are not built yet: they need a CUDA machine to be
    # tested on. Refused here rather than ignored by the stage.
    return "QLoRA (quantize: 4bit) is not supported yet by this version of baton; leave quantize out"


def module_names(source: dict[str, Any], model_class: str) -> tuple[str, ...] | None:
    """The module names of `model_class` (an AutoModel… class of transformers) built from a resolved model input
    (a config, or a local folder's config.json), on the meta device (no memory, no weights read); None where
    validate cannot know them (a hub name, a config that is refused)."""
    if source["source"] == "config":
        values, key = source["config"], ["config", source["config"], model_class]
    elif source["digest"] is not None:
        values, key = None, ["folder", source["path"], source["digest"], model_class]
    else:
        return None
    found, problems = _remembered("module names", key, lambda: _module_names(values, source["path"], model_class))
    return None if problems else tuple(found)


def _module_names(values: dict[str, Any] | None, path: str | None, model_class: str) -> tuple[list[str], list[str]]:
    with _quiet() as transformers:
        import torch  # transformers has imported it

        try:
            built = (transformers.AutoConfig.for_model(**values) if values is not None
                     else transformers.AutoConfig.from_pretrained(path, local_files_only=True))
            with torch.device("meta"):
                model = getattr(transformers, model_class).from_config(built)
        except Exception as e:  # reported by the model checks
            return [], [_one_line(e)]
    return [name for name, _ in model.named_modules() if name], []


def unmatched(keys: list[str], names: tuple[str, ...]) -> list[str]:
    """The keys of adapter.target_modules or modules_to_save that name no module, as peft matches them: a
    module's full name, or its ending after a dot."""
    return [k for k in keys if k != "all-linear" and not any(n == k or n.endswith("." + k) for n in names)]


def short_names(names: tuple[str, ...]) -> str:
    """The distinct last parts of module names (q_proj, c_attn, classifier …), for a message."""
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()}))


# ----------------------------------------------------------------- tokenizers


@functools.cache
def tokenizer_folder(path: str, digest: str) -> tuple[str | None, str | None]:
    """A local folder (its files' `digest`) as the stage's tokenizer (`AutoTokenizer.from_pretrained`):
    (its `vocabulary`, or None; why it gives no tokenizer, or None). The stage also needs a pad token."""
    found, problem = _remembered("tokenizer folder", [path, digest], lambda: _tokenizer_folder(path))
    return found, problem or None


def holds_tokenizer(path: str) -> bool:
    """Whether a local folder holds tokenizer files (a model folder may hold weights only)."""
    return any(next(Path(path).glob(pattern), None) for pattern in TOKENIZER_FILES)


def _tokenizer_folder(path: str) -> tuple[str | None, str | None]:
    if not holds_tokenizer(path):
        return None, (f"{path} holds no tokenizer: none of tokenizer.json, tokenizer_config.json, vocab.*, *.model, "
                      "merges.txt")
    with _quiet() as transformers:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            return None, f"{path} does not load as a tokenizer: {_one_line(e)}"
    if len(tok) <= len(tok.all_special_tokens):
        return None, f"{path} holds no tokenizer vocabulary: it loads with only its {len(tok)} special tokens"
    if tok.pad_token_id is None:
        return None, f"{path}: the tokenizer has no pad token (the stage pads its batches)"
    return vocabulary(tok), None


# ----------------------------------------------------------------- transformers, quietly; what passed before


@contextlib.contextmanager
def _quiet() -> Iterator[Any]:
    """transformers with its warnings and log lines silenced (validate prints one line per problem, nothing
    else); yields the module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield transformers
        finally:
            hf_logging.set_verbosity(level)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _remembered(what: str, key: Any, check: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """`verdicts.remembered` for the checks of this module, judged by transformers and these rules."""
    return verdicts.remembered("modelcheck", what, key,
                               verdicts.judges(__file__, "transformers", "huggingface_hub", "tokenizers"), check)