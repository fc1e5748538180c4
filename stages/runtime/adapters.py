"""LoRA adapters (spec.adapter), through peft: wrap a built model so that only the adapter trains, and save the
adapter with the merged model. Every training kind gets them through the lifecycle: the kind builds its model as
always, `wrap` adds the adapter before the kind's own wrapping and the engine, and export saves with `save`.

final/ then holds the adapter in final/adapter/ (adapter_config.json, adapter_model.safetensors, for
`PeftModel.from_pretrained(base, "final/adapter")`) and, with adapter.merge (the default), the model with the
adapter merged in, in the ordinary `from_pretrained` layout of final/ itself. The adapter has a folder of its own
because transformers' `from_pretrained` loads an adapter it finds beside a model on top of that model: the merged
weights would get the update twice.

A frozen reference (preference tuning) is the same model with the adapter switched off: `with disabled(model):`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from stages.runtime import dist, engine, records
from stages.runtime.models import verify_digest
from stages.runtime.spec import SpecError, TrainingSpec

ADAPTER = "adapter"  # final/adapter/: the adapter's folder below final/


def wrap(spec: TrainingSpec, model: nn.Module) -> nn.Module:
    """Collective where ZeRO-3 partitions the model (peft gathers what modules_to_save copies). `model` with a LoRA
    adapter in its linear layers, as peft's PeftModel: a new one (seeded alike on every rank, as `build_model`
    left the RNG), or the one of inputs.adapter (adapter.from) to train on. Everything else of `model` is frozen;
    `model` itself is changed in place (its layers hold the adapter), and `base(peft)` is it again."""
    from peft import LoraConfig, PeftModel, get_peft_model

    a = spec.adapter
    assert a is not None, "wrap is for a stage with an adapter"
    ref = spec.inputs.get("adapter")
    try:
        if ref is not None:
            assert not isinstance(ref, list) and ref.path is not None, "the launcher resolves adapter.from"
            verify_digest("inputs.adapter", ref.path, ref.digest)
            peft = PeftModel.from_pretrained(model, Path(ref.path, ADAPTER), is_trainable=True)
        else:
            targets = "all-linear" if a.target_modules == ["all-linear"] else a.target_modules
            # lora_alpha is typed int, but peft scales by alpha / r whatever the number
            peft = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha,  # type: ignore[arg-type]
                                                    lora_dropout=a.dropout,
                                                    target_modules=targets, modules_to_save=a.modules_to_save))
    except ValueError as e:  # peft's: no default target modules for the model type, none matched …
        raise SpecError(f"adapter: {e}") from None
    if engine.zero_stage(spec) == 3 and spec.precision != "fp32":
        # ZeRO-3 partitions the parameters it finds whole (the adapter's, made after the base was partitioned in
        # the working dtype) without casting them, and its partitions must all have one dtype
        dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float16
        for p in peft.parameters():
            if not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(dtype)
    trainable, total = counts(peft)
    dist.print0(f"{spec.stage}: LoRA adapter (r {peft.peft_config['default'].r}), {trainable:,} of {total:,} "
                f"parameters train ({100 * trainable / max(total, 1):.2f}%)")
    records.log("adapter", trainable_params=trainable, total_params=total,
                continued_from=None if ref is None else ref.path)
    return peft


def base(peft: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (its layers hold the adapter): what the kind trains and scores."""
    return peft.get_base_model()  # type: ignore[operator]


def counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of `model`, ZeRO-3 partitions counted whole, tied ones once."""
    params = {id(p): p for p in model.parameters()}.values()
    size = [(int(getattr(p, "ds_numel", 0) or p.numel()), p.requires_grad) for p in params]
    return sum(n for n, t in size if t), sum(n for n, _ in size)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """The base model alone inside the block: every adapter layer (and modules_to_save, which then use the original
    module) of `model` (a PeftModel or the model inside it) switched off, as peft's `disable_adapter()` does. The
    frozen reference of preference tuning, without a second copy of the base."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def save(peft: nn.Module, path: Path, masters: dict[int, torch.Tensor], *, merge: bool, base_path: str | None
         ) -> tuple[nn.Module, dict[str, torch.Tensor]] | None:
    """Rank 0, every parameter whole (gathered under ZeRO-3). Writes the adapter to `path`/adapter/ and returns the
    merged model to save in `path` (the transformers model and its state: base weights plus each adapter's update,
    modules_to_save's trained copies, under the base model's own names); None with merge false. `masters`: fp32
    values by parameter id (a bf16/fp16 run's), used for the adapter and the update. `base_path`: the base model's
    folder, recorded in adapter_config.json."""
    config: Any = peft.peft_config["default"]  # type: ignore[index]
    config.base_model_name_or_path = base_path
    if isinstance(config.target_modules, set):  # peft writes a set in hash order: the same stage, another digest
        config.target_modules = sorted(config.target_modules)
    with _masters(peft, masters):
        peft.save_pretrained(path / ADAPTER, safe_serialization=True)  # type: ignore[operator]
        (path / ADAPTER / "README.md").unlink(missing_ok=True)  # peft's empty model card template
        return (base(peft), merged(peft)) if merge else None


def merged(peft: nn.Module) -> dict[str, torch.Tensor]:
    """The state of the model inside `peft` with the adapter merged in (fp32), under the names the model has
    without it; the model itself is left as it is (peft's merge_and_unload would change it in place)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    model = base(peft)
    deltas: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.scaling:
            deltas[f"{name}.base_layer.weight"] = cast(Any, m).get_delta_weight("default").float()  # each type has one
    wrapped = [f"{name}." for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    out: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}  # by storage: tied weights (an LM head and its embedding) stay one tensor
    for key, value in model.state_dict().items():
        if any(p.startswith("lora_") for p in key.split(".")) or ".original_module." in key:
            continue
        own = key.replace(".base_layer.", ".")
        for prefix in wrapped:
            if own.startswith(f"{prefix}modules_to_save.default."):
                own = prefix + own[len(f"{prefix}modules_to_save.default."):]
        if key in deltas:
            out[own] = value.float() + deltas[key]
        elif value.is_floating_point():
            if value.data_ptr() not in copies:
                copies[value.data_ptr()] = value.detach().float().clone()
            out[own] = copies[value.data_ptr()]
        else:
            out[own] = value
    return out


@contextlib.contextmanager
def _masters(model: nn.Module, masters: dict[int, torch.Tensor]) -> Iterator[None]:
    """Inside the block the trained parameters of `model` hold their fp32 masters (rank 0, a bf16/fp16 run)."""
    kept = []
    for p in model.parameters():
        if id(p) in masters:
            kept.append((p, p.data))
            p.data = masters[id(p)].to(p.device)
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data
