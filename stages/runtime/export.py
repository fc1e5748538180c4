"""final/: the hand-off to the next stage, loadable with transformers' `from_pretrained`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from launcher.files import dir_digest, fsync_dir
from stages.runtime import dist


def save_final(model, tokenizer, stage_dir: str, *, zero_stage: int) -> tuple[str, str | None]:
    """Collective. Writes `save_pretrained` safetensors + tokenizer to final.tmp/, then renames it to final/.

    `model` is the transformers model itself (unwrapped). Under ZeRO-3 each rank
    holds a shard, so all ranks gather and rank 0 writes. Returns (path, digest);
    the digest only on rank 0.
    """
    final, tmp = Path(stage_dir, "final"), Path(stage_dir, "final.tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if dist.is_main():
                _write(model, tokenizer, tmp)
    elif dist.is_main():
        _write(model, tokenizer, tmp)
    digest = None
    if dist.is_main():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        digest = dir_digest(final)
    dist.barrier()
    return str(final), digest


def _write(model, tokenizer, path: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with torch.no_grad():
        # save_original_format=False: under ZeRO-3, from_pretrained records legacy renamings it never applied,
        # and "reverting" them would save LayerNorm.weight as LayerNorm.gamma. Names as in memory load everywhere.
        model.save_pretrained(path, safe_serialization=True, save_original_format=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
