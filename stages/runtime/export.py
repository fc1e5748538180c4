"""final/: the hand-off to the next stage, loadable with transformers' `from_pretrained`; and result.json."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from contract import layout
from contract.files import dir_digest, fsync_dir, json_safe, write_json
from contract.layout import Output, Result, final_dir
from stages.runtime import adapters, dist
from stages.runtime.spec import Diverged, Ref, Spec


def save_final(model, tokenizer, spec: Spec, *, zero_stage: int, beside: dict[str, Any] | None = None,
               files: dict[str, Any] | None = None, folder: Path | None = None) -> tuple[str, str | None]:
    """Collective. Writes `save_pretrained` safetensors + tokenizer to final.tmp/, then publishes it as final/
    (or as `folder`, through <folder>.tmp/: eval.best's best/).

    `model` is the transformers model itself (unwrapped); `beside` maps folders below final/ to more such models
    (multitask: {"tasks/<task>": its classifier}), each saved with the tokenizer; `files` maps file names to JSON
    values written beside the model (eval.score_train's losses). Under ZeRO-3 each rank holds a
    shard, so all ranks gather and rank 0 writes. Trained in bf16 or fp16, final/ holds the fp32 master weights
    (the optimizer's), not the rounded working copy. Returns (path, digest); the digest only on rank 0.
    """
    final = folder or Path(final_dir(spec.stage_dir))
    tmp = final.with_name(f"{final.name}.tmp")
    folders = {"": model} | (beside or {})
    masters = _fp32_masters(folders) if spec.precision != "fp32" else {}
    gathered: Any = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        params = list({id(p): p for m in folders.values() for p in m.parameters()}.values())
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gathered:
        for m in folders.values():
            _check_finite(m)
        if dist.is_main():
            out = staging(final)
            for below, m in folders.items():
                _write(m, tokenizer, out / below, masters, spec if below == "" else None)
            for name, value in (files or {}).items():
                write_json(out / name, json_safe(value))
    digest = publish(tmp, final) if dist.is_main() else None
    dist.barrier()
    return str(final), digest


def write_folder(spec: Spec, fill: Callable[[Path], None]) -> tuple[str, str | None]:
    """Collective. final/ of a stage whose output is not one trained model (prune, ensemble, teacher_logits): rank 0
    has `fill(folder)` write into an empty final.tmp/, which is then published as final/. Returns (path, digest);
    the digest only on rank 0."""
    final, digest = final_dir(spec.stage_dir), None
    if dist.is_main():
        tmp = staging(final)
        fill(tmp)
        digest = publish(tmp, final)
    dist.barrier()
    return str(final), digest


def staging(final: Path) -> Path:
    """An empty final.tmp/ (<name>.tmp/) beside `final` to write the output into (rank 0)."""
    tmp = final.with_name(f"{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> str:
    """Rank 0: fsync what `tmp` holds, swap it in as `final` and return final's digest.

    Readers see the old final/ or the new one, never a half-written folder.
    """
    for p in sorted(tmp.rglob("*")):  # sub-folders too (multitask: final/tasks/<name>/)
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return dir_digest(final)


def _check_finite(model) -> None:
    """final/ never holds NaN or infinity. Every rank sees the full parameters here, so all decide alike."""
    with torch.no_grad():
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise Diverged(f"final/ not written: {len(bad)} parameter tensor(s) hold NaN or infinity ({bad[0]} …)")


def _fp32_masters(folders: dict[str, Any]) -> dict[int, torch.Tensor]:
    """Collective. A bf16/fp16 run's fp32 master weights, on rank 0, by id of the parameter: what DeepSpeed's
    optimizer holds (partitioned under ZeRO, gathered here). A parameter the optimizer does not hold (a frozen one)
    has none: its working copy is all there is."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[int, torch.Tensor] = {}
    for m in folders.values():
        for p in m.parameters():
            if id(p) not in out:
                full = safe_get_full_fp32_param(p)  # collective: every rank asks for every parameter, in order
                if full is not None and dist.is_main():
                    out[id(p)] = full.detach().float().cpu()
    return out


def _write(model, tokenizer, path: Path, masters: dict[int, torch.Tensor], spec: Spec | None) -> None:
    """`masters`: fp32 values by parameter id (a bf16/fp16 run's); the model's other floating tensors (frozen
    parameters, buffers) are then saved in fp32 too. `spec`: the stage's, for the model it trains (None for the
    models beside it); with spec.adapter the model is peft's, which saves the adapter in adapter/ and, unless
    adapter.merge is false, the model with the adapter merged in."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    state = None
    if spec is not None and spec.adapter is not None:
        init = spec.inputs.get("init")
        base_path = init.path if isinstance(init, Ref) else None
        done = adapters.save(model, path, masters, merge=spec.adapter.merge, base_path=base_path)
        model, state = done if done else (None, None)
    elif masters:
        params = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}  # tied: every name
        state = {}
        for name, value in model.state_dict().items():
            master = masters.get(params.get(name, -1))
            state[name] = master if master is not None else value.float() if value.is_floating_point() else value
    if model is None:  # the adapter alone (adapter.merge false)
        save_tokenizer(tokenizer, path)
        return
    with torch.no_grad():
        # save_original_format=False: under ZeRO-3, from_pretrained records legacy renamings it never applied,
        # and "reverting" them would save LayerNorm.weight as LayerNorm.gamma. Names as in memory load everywhere.
        model.save_pretrained(path, state_dict=state, safe_serialization=True, save_original_format=False)
    if masters:  # save_pretrained wrote the working copy's dtype into config.json
        model.config.dtype = "float32"
        model.config.save_pretrained(path)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)


def save_tokenizer(tokenizer, path: Path | str) -> None:
    """`save_pretrained`, without the truncation and padding that the last call left set on a fast tokenizer's
    backend: tokenizer.json would otherwise hold them or not as this process tokenized its data or found it in the
    run's cache, and the same stage would hand on two different digests."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    tokenizer.save_pretrained(path)


def write_result(spec: Spec, *, steps: int, samples: int, output: str, digest: str | None,
                 metrics: dict[str, float], **selected: Any) -> None:
    """result.json, last of all (rank 0): what the launcher records in the ledger. `selected`: eval.best's
    best_step, last_metrics and stopped_early."""
    if not dist.is_main():
        return
    result = Result(stage=spec.stage, kind=spec.kind, fingerprint=spec.fingerprint, steps=steps, samples=samples,
                    output=Output(path=output, digest=digest), metrics=json_safe(metrics), time=time.time(),
                    **json_safe(selected))
    layout.write_result(spec.stage_dir, result)
