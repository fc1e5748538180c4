"""Stage checkpoints: DeepSpeed state + per-rank RNG + COMPLETE marker + LATEST pointer.

A folder counts only once rank 0 has written COMPLETE after a barrier that
follows every rank's files; LATEST is replaced atomically after that, and older
checkpoints are pruned only then.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from contract.files import fsync_dir, write_atomic, write_json
from contract.layout import TAG, ckpt_dir, complete_tags, newest_complete, step_of, tag_of
from stages.runtime import dist
from stages.runtime.spec import Spec, SpecError


@dataclass(frozen=True, slots=True)
class Position:
    step: int
    samples: int


def find_latest(spec: Spec) -> str | None:
    """The newest complete checkpoint's tag, or None. Another fingerprint is an error (exit 2).

    Scans for COMPLETE rather than trusting LATEST alone: a run killed between
    the two writes still resumes from the newer, complete checkpoint.
    """
    found = newest_complete(spec.stage_dir)
    if found is None:
        return None
    tag, marker = found
    if marker.get("fingerprint") != spec.fingerprint:
        raise SpecError(
            f"{ckpt_dir(spec.stage_dir) / tag}: checkpoint fingerprint {marker.get('fingerprint')} != spec fingerprint "
            f"{spec.fingerprint}; the stage changed, clear its folder to rerun it"
        )
    return tag


def save(engine, spec: Spec, pos: Position) -> str:
    """Collective. Returns the tag."""
    root, tag = ckpt_dir(spec.stage_dir), tag_of(pos.step)
    client = {"step": pos.step, "samples": pos.samples, "fingerprint": spec.fingerprint}
    engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    rng_path = root / tag / f"rng-rank{dist.rank()}.pt"
    torch.save(_rng_state(), rng_path)
    with open(rng_path, "rb+") as f:
        os.fsync(f.fileno())
    # DeepSpeed's own writes are not fsynced; do it for every file this rank wrote before the barrier.
    for p in (root / tag).iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    dist.barrier()
    if dist.is_main():
        write_json(root / tag / "COMPLETE", client | {"time": time.time()})
        write_atomic(root / "LATEST", tag + "\n")
        _prune(root, spec.checkpoint.keep_last if spec.checkpoint else 1, pos.step)
    return tag


def load(engine, spec: Spec, tag: str) -> Position:
    """Collective. Restores model, optimizer, scheduler, this rank's RNG; returns the data position."""
    root = ckpt_dir(spec.stage_dir)
    path, client = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"{root / tag}: DeepSpeed found no checkpoint to load")
    _set_rng_state(torch.load(root / tag / f"rng-rank{dist.rank()}.pt", weights_only=True))
    return Position(step=int(client["step"]), samples=int(client["samples"]))


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _prune(root: Path, keep_last: int, newest: int) -> None:
    complete = [step_of(t) for t in complete_tags(root.parent)]
    doomed = set(complete[:-keep_last] if keep_last > 0 else complete[:-1])
    # Folders a killed run left without COMPLETE are never used; drop the older ones.
    doomed |= {step_of(p.name) for p in root.glob("step*") if TAG.fullmatch(p.name) and step_of(p.name) < newest
               and not (p / "COMPLETE").exists()}
    for step in sorted(doomed):
        shutil.rmtree(root / tag_of(step), ignore_errors=True)
    if doomed:
        fsync_dir(root)
