"""ds_configs/*.json + a stage's settings -> the final DeepSpeed config of that stage.

The shipped templates say "auto" where the manifest decides (batch sizes, optimizer
hyper-parameters, clipping, precision). A concrete value in a template or in the
manifest's overrides must agree with the manifest, or loading fails naming both.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
from pathlib import Path
from typing import Any

from contract.imports import DEEPSPEED_UNUSED, hidden
from launcher import verdicts
from launcher.errors import ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def template_path(config: str, manifest_dir: Path) -> Path:
    """A template by name (zero2) or a JSON path relative to the manifest."""
    if "/" not in config and not config.endswith(".json"):
        return DS_CONFIG_DIR / f"{config}.json"
    return (manifest_dir / config).resolve()


def known_templates() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def read_template(path: Path, where: str) -> dict[str, Any]:
    if not path.is_file():
        hint = f"; shipped configs: {', '.join(known_templates())}" if path.parent == DS_CONFIG_DIR else ""
        raise ConfigError(f"{where}: DeepSpeed config not found: {path}{hint}")
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the DeepSpeed config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{where}: DeepSpeed config {path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                          "save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno} invalid JSON: {e.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}:1 invalid JSON: nested too deep") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1 a DeepSpeed config is a JSON object")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested mappings merge key by key, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def fill(config: dict[str, Any], train: dict[str, Any], precision: str, world_size: int, source: str) -> dict[str, Any]:
    """Replace "auto" with the manifest's values; check concrete values agree with it.

    `train` is the stage's resolved train settings (micro_batch_size, grad_accum, lr, …);
    `source` names the template and the overrides for error messages.
    """
    cfg = copy.deepcopy(config)
    problems: list[str] = []
    if "scheduler" in cfg:
        problems.append(f"{source}: scheduler: remove it; the schedule comes from the stage's train.schedule "
                        "and warmup_steps")
    micro, accum = train["micro_batch_size"], train["grad_accum"]
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": train["max_grad_norm"] or 0.0,
    }
    for key, value in wanted.items():
        _settle(cfg, (key,), value, source, problems, f"train settings × world size {world_size}")
    optimizer = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(optimizer.get("type", "")).lower() not in ("adamw", "adam"):
        problems.append(f"{source}: optimizer.type: {optimizer.get('type')!r}; "
                        "baton fills AdamW/Adam settings, use one of those")
    for key, value in (("lr", train["lr"]), ("betas", list(train["betas"])), ("eps", train["eps"]),
                       ("weight_decay", train["weight_decay"])):
        _settle(cfg, ("optimizer", "params", key), value, source, problems, f"train.{key}")
    for mode in ("bf16", "fp16"):
        _settle(cfg, (mode, "enabled"), precision == mode, source, problems, f"precision {precision}")
    problems += [f"{source}: {path}: {value} is not a finite number" for path, value in _non_finite(cfg)]
    problems += _offload_paths(cfg, source)
    if problems:
        raise ConfigError(problems)
    return cfg


def _non_finite(node: Any, path: str = "") -> list[tuple[str, str]]:
    """(dotted path, NaN/Infinity) of every number that is not finite: JSON's NaN and YAML's .inf reach DeepSpeed,
    which takes them (an optimizer's momentum of NaN trains a NaN model)."""
    if isinstance(node, float) and not math.isfinite(node):
        return [(path, json.dumps(node))]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return [found for key, value in items for found in _non_finite(value, f"{path}.{key}" if path else str(key))]


def _offload_paths(cfg: dict[str, Any], source: str) -> list[str]:
    """An NVMe offload's nvme_path must be a folder (on this machine; under Slurm, the login node sees the same
    file systems as a rule): DeepSpeed finds out only when the stage builds its engine."""
    zero = cfg.get("zero_optimization")
    problems = []
    for part in ("offload_optimizer", "offload_param"):
        offload = zero.get(part) if isinstance(zero, dict) else None
        if not isinstance(offload, dict) or offload.get("device") != "nvme":
            continue
        path = offload.get("nvme_path")
        if not isinstance(path, str) or not Path(path).is_dir():
            problems.append(f"{source}: zero_optimization.{part}.nvme_path: {path}: no such folder "
                            "(device nvme needs a folder on a fast local disk)")
    return problems


def _settle(cfg: dict, path: tuple[str, ...], value: Any, source: str, problems: list[str], origin: str) -> None:
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    key = path[-1]
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif _differs(current, value):
        problems.append(
            f"{source}: {'.'.join(path)}: is {current!r} but the manifest gives {value!r} ({origin}); "
            "set it to \"auto\" or change the manifest"
        )


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) > 1e-12 * max(1.0, abs(float(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    return a != b


def check_with_deepspeed(config: dict[str, Any], source: str) -> None:
    """Let DeepSpeed's own config parser judge the final config (imports deepspeed: ~2.5 s). A config it accepted
    is remembered (`launcher.verdicts`, for this DeepSpeed and this file), so a run launched again does not import
    DeepSpeed to judge it again.

    DeepSpeed ignores top-level keys it does not know (a misspelt `zero_optimizaton` ran ZeRO-0), so
    unknown keys there and in zero_optimization are refused first, with the nearest known key.
    """
    _, problems = verdicts.remembered("deepspeed", "config", config, verdicts.judges(__file__, "deepspeed"),
                                      lambda: (None, _judged(config, source)))
    if problems:
        raise ConfigError(problems)


def _judged(config: dict[str, Any], source: str) -> list[str]:
    import contextlib
    import io
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    top, zero = known_keys()
    # should a later DeepSpeed read its config another way, the recording sees nothing: check no keys then
    problems = _unknown(config, top, "", source) if {"optimizer", "zero_optimization", "bf16"} <= top else []
    if isinstance(config.get("zero_optimization"), dict):
        problems += _unknown(config["zero_optimization"], zero, "zero_optimization.", source)
    if problems:
        return problems
    # DeepSpeed checks train_batch_size against the world size it sees (1 here, no process group);
    # the launcher has already checked the arithmetic for the real world size.
    probe = copy.deepcopy(config)
    probe["train_batch_size"] = probe["train_micro_batch_size_per_gpu"] * probe["gradient_accumulation_steps"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from deepspeed.runtime.config import DeepSpeedConfig

        try:
            DeepSpeedConfig(probe)
        except Exception as e:  # DeepSpeed raises pydantic errors, ValueError, AssertionError …
            detail = " ".join(str(e).split())
            return [f"{source}: DeepSpeed rejects the config: {detail[:600]}"]
    return []


def _unknown(section: dict[str, Any], known: frozenset[str], prefix: str, source: str) -> list[str]:
    problems = []
    for key in section:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {near[0]}?" if near else "see DeepSpeed's config documentation"
            problems.append(f"{source}: DeepSpeed rejects the config: {prefix}{key}: unknown DeepSpeed key; {hint}")
    return problems


@functools.cache
def known_keys() -> tuple[frozenset[str], frozenset[str]]:
    """(top-level keys, zero_optimization keys) of the installed DeepSpeed.

    zero_optimization's come from DeepSpeed's pydantic model (names and aliases). Top-level keys have
    no model: DeepSpeedConfig reads them one by one from the dict, so they are the keys it asks a
    recording dict for while parsing a small valid config.
    """
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            hidden(*DEEPSPEED_UNUSED):  # contract/imports.py
        from deepspeed.runtime.config import DeepSpeedConfig
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        zero = {alias for name, f in DeepSpeedZeroConfig.model_fields.items() for alias in (name, f.alias) if alias}
        asked: set[str] = set()
        DeepSpeedConfig(_Recording({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
                                    "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}}, asked))
    return frozenset(asked), frozenset(zero)


class _Recording(dict[str, Any]):
    """A dict that notes every key looked up in it (however the lookup is spelt)."""

    def __init__(self, data: dict[str, Any], asked: set[str]) -> None:
        super().__init__(data)
        self.asked = asked

    def __getitem__(self, key: Any) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)

    def keys(self) -> Any:
        return _RecordingKeys(self)


class _RecordingKeys:
    def __init__(self, owner: _Recording) -> None:
        self.owner = owner

    def __contains__(self, key: object) -> bool:
        return key in self.owner

    def __iter__(self) -> Any:
        return iter(dict.keys(self.owner))
