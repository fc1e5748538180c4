"""Stage checkpoints: DeepSpeed state + per-rank RNG + COMPLETE marker + LATEST pointer.

A folder counts only once rank 0 has written COMPLETE after a barrier that
follows every rank's files; LATEST is replaced atomically after that, and older
checkpoints are pruned only then. COMPLETE lists every file's size and digest,
and a resume checks them: a damaged checkpoint (a disk error, a file cut short)
is passed over for the previous intact one, never trained on.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from contract.files import file_digest, fsync_dir, write_atomic, write_json
from contract.layout import TAG, ckpt_dir, complete_tags, step_of, tag_of
from stages.runtime import dist
from stages.runtime.spec import Spec, SpecError


@dataclass(frozen=True, slots=True)
class Position:
    step: int
    samples: int


def find_latest(spec: Spec) -> str | None:
    """Collective. The newest complete and intact checkpoint's tag, or None when there is no checkpoint.

    Scans for COMPLETE rather than trusting LATEST alone: a run killed between
    the two writes still resumes from the newer, complete checkpoint. A checkpoint
    whose files differ from what COMPLETE recorded is passed over with a warning
    naming the file; when none is intact, or the newest was made with another
    fingerprint, the stage stops with exit 2.
    """
    root = ckpt_dir(spec.stage_dir)
    damaged: list[str] = []
    for n, tag in enumerate(reversed(complete_tags(spec.stage_dir))):
        try:
            marker = json.loads((root / tag / "COMPLETE").read_text())
        except (OSError, ValueError):
            damaged.append(f"{tag}/COMPLETE: unreadable")
            continue
        if n == 0 and marker.get("fingerprint") != spec.fingerprint:
            raise SpecError(
                f"{root / tag}: checkpoint fingerprint {marker.get('fingerprint')} != spec fingerprint "
                f"{spec.fingerprint}; the stage changed, clear its folder to rerun it"
            )
        problem = verify(root / tag, marker.get("files"))
        if problem is None:
            if damaged:
                dist.print0(f"warning: resuming from {tag}, the newest intact checkpoint")
            return tag
        damaged.append(f"{tag}/{problem}")
        dist.print0(f"warning: checkpoint {tag} is damaged ({problem}); trying the one before it")
    if damaged:
        raise SpecError(f"{root}: no intact checkpoint to resume from ({'; '.join(damaged)}); "
                        "delete the stage folder's ckpt/ to start the stage over")
    return None


def verify(folder: Path, files: dict[str, dict] | None) -> str | None:
    """Collective. None when every file COMPLETE lists has its recorded size and digest, else what is wrong.

    Sizes are checked on every rank (cheap); the digests are split between the ranks, so
    together they read the checkpoint once. Checkpoints from before baton recorded files pass.
    """
    if files is None:
        return None
    for name, record in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != record["size"]:
            return f"{name}: {path.stat().st_size} bytes, {record['size']} when saved"
    names = sorted(files)
    mine = [f"{n}: content differs from when it was saved" for n in names[dist.rank()::dist.world_size()]
            if file_digest(folder / n) != files[n]["digest"]]
    problems = sorted(p for part in dist.all_gather_objects(mine) for p in part)
    return problems[0] if problems else None


def _records(folder: Path) -> dict[str, dict]:
    """Collective. {file name: {"size", "digest"}} for every file of a checkpoint folder, the ranks sharing the work."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "COMPLETE")
    mine = {n: {"size": (folder / n).stat().st_size, "digest": file_digest(folder / n)}
            for n in names[dist.rank()::dist.world_size()]}
    return {name: record for part in dist.all_gather_objects(mine) for name, record in part.items()}


def save(engine, spec: Spec, pos: Position) -> str:
    """Collective. Returns the tag."""
    root, tag = ckpt_dir(spec.stage_dir), tag_of(pos.step)
    client = {"step": pos.step, "samples": pos.samples, "fingerprint": spec.fingerprint}
    if dist.is_main() and (root / tag / "COMPLETE").exists():
        # A resumed run saves this step again: the folder must not count as complete while it is rewritten.
        (root / tag / "COMPLETE").unlink()
        fsync_dir(root / tag)
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
    files = _records(root / tag)
    if dist.is_main():
        write_json(root / tag / "COMPLETE", client | {"time": time.time(), "files": files})
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
