"""Stage checkpoints: DeepSpeed state + per-rank RNG + COMPLETE marker + LATEST pointer.

A folder counts only once rank 0 has written COMPLETE after a barrier that
follows every rank's files; LATEST is replaced atomically after that, and older
checkpoints are pruned only then. COMPLETE lists every file's size and CRC-32,
and a resume checks them: a damaged checkpoint (a disk error, a file cut short)
is passed over for the previous intact one, never trained on. A save that runs out
of disk space removes its unfinished folder (which would never count) and ends the
stage with exit 2 naming the step it was saving and the step that is intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from contract.files import content_matches, file_checksum, fsync_dir, write_atomic, write_json
from contract.layout import TAG, ckpt_dir, complete_tags, continues, step_of, tag_of
from stages.runtime import dist
from stages.runtime.spec import Spec, SpecError, TrainingSpec

UNIVERSAL = "universal"  # ckpt/universal/<tag>/: a checkpoint converted for another world size
# torch's zip writer turns a short write into a RuntimeError that carries no errno
SHORT_WRITE = ("unexpected pos", "file write failed", "No space left on device")
NEARLY_FULL = 64 << 20  # bytes free under which such a RuntimeError is taken for a full disk


class NoSpace(SpecError):
    """A write found the disk full: exit 2 with this one line, reported by whichever rank met it (entry.failure);
    error.json says no_space, so that the launcher keeps the checkpoints and a rerun resumes."""


def free_bytes(path: str | Path) -> int:
    """Bytes free to this user on the file system of `path` (of its nearest existing folder)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def no_space(e: BaseException, folder: str | Path) -> bool:
    """Whether `e` is a write that found the disk (or the user's quota) full; `folder`: where it wrote."""
    if isinstance(e, NoSpace):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError) and any(s in str(e) for s in SHORT_WRITE):
        try:
            return free_bytes(folder) < NEARLY_FULL
        except OSError:
            return False
    return False


def intact(stage_folder: str | Path) -> str:
    """`step 8 is intact (<its folder>)`, of the newest complete checkpoint: what a rerun resumes from."""
    tags = complete_tags(stage_folder)
    if not tags:
        return "no checkpoint is intact yet"
    return f"step {step_of(tags[-1])} is intact ({ckpt_dir(stage_folder) / tags[-1]})"


@dataclass(frozen=True, slots=True)
class Position:
    step: int
    samples: int
    best: dict | None = None  # eval.best's selection after this step (`best.Selection.state`)


@dataclass(frozen=True, slots=True)
class Saved:
    tag: str
    world_size: int | None  # what it was saved at; None: before baton recorded it


def find_latest(spec: Spec) -> Saved | None:
    """Collective. The newest complete and intact checkpoint, or None when there is no checkpoint.

    Scans for COMPLETE rather than trusting LATEST alone: a run killed between
    the two writes still resumes from the newer, complete checkpoint. A checkpoint
    whose files differ from what COMPLETE recorded is passed over with a warning
    naming the file; when none is intact, or the newest does not continue this
    stage (other settings), the stage stops with exit 2.
    """
    root = ckpt_dir(spec.stage_dir)
    damaged: list[str] = []
    for n, tag in enumerate(reversed(complete_tags(spec.stage_dir))):
        try:
            marker = json.loads((root / tag / "COMPLETE").read_text())
        except (OSError, ValueError):
            damaged.append(f"{tag}/COMPLETE: unreadable")
            continue
        if n == 0 and not continues(marker, spec.fingerprint, spec.any_world):
            raise SpecError(
                f"{root / tag}: checkpoint fingerprint {marker.get('fingerprint')} != spec fingerprint "
                f"{spec.fingerprint}; the stage changed, clear its folder to rerun it"
            )
        problem = verify(root / tag, marker.get("files"))
        if problem is None:
            if damaged:
                dist.print0(f"warning: resuming from {tag}, the newest intact checkpoint")
            return Saved(tag, marker.get("world_size"))
        damaged.append(f"{tag}/{problem}")
        dist.print0(f"warning: checkpoint {tag} is damaged ({problem}); trying the one before it")
    if damaged:
        raise SpecError(f"{root}: no intact checkpoint to resume from ({'; '.join(damaged)}); "
                        "delete the stage folder's ckpt/ to start the stage over")
    return None


def to_universal(spec: Spec, tag: str) -> None:
    """Collective. Convert a checkpoint saved at another world size into DeepSpeed's universal format, in
    ckpt/universal/<tag>/ (kept until the next checkpoint is saved, so a second attempt need not convert again).

    ZeRO-1 and 2 checkpoints hold no state for parameters that never had a gradient: --inject_missing_state
    fills it in, as DeepSpeed's docs ask."""
    out = ckpt_dir(spec.stage_dir) / UNIVERSAL / tag
    if dist.is_main() and not (out / "DONE").exists():
        shutil.rmtree(out, ignore_errors=True)
        dist.print0(f"{spec.stage}: converting {tag} to a universal checkpoint for world size {dist.world_size()}")
        proc = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
             str(ckpt_dir(spec.stage_dir) / tag), "--output_folder", str(out), "--inject_missing_state"],
            capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {tag} to a universal checkpoint failed:\n{proc.stdout[-3000:]}"
                               f"{proc.stderr[-3000:]}")
        write_atomic(out / "DONE", tag + "\n")
    dist.barrier()


def verify(folder: Path, files: dict[str, dict] | None) -> str | None:
    """Collective. None when every file COMPLETE lists has its recorded size and checksum, else what is wrong.

    Sizes are checked on every rank (cheap); the checksums are split between the ranks, so
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
            if not content_matches(folder / n, files[n]["digest"])]
    problems = sorted(p for part in dist.all_gather_objects(mine) for p in part)
    return problems[0] if problems else None


def _records(folder: Path) -> dict[str, dict]:
    """Collective. {file name: {"size", "digest": its crc32 checksum}} for every file of a checkpoint folder, the
    ranks sharing the work."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "COMPLETE")
    mine = {n: {"size": (folder / n).stat().st_size, "digest": file_checksum(folder / n)}
            for n in names[dist.rank()::dist.world_size()]}
    return {name: record for part in dist.all_gather_objects(mine) for name, record in part.items()}


def save(engine, spec: TrainingSpec, pos: Position) -> str:
    """Collective. Returns the tag. NoSpace when the disk fills: the unfinished folder is removed (it never counts,
    and the space it took lets the launcher record the end)."""
    root, tag = ckpt_dir(spec.stage_dir), tag_of(pos.step)
    try:
        return _save(engine, spec, pos, root, tag)
    except (OSError, RuntimeError) as e:
        if not no_space(e, root):
            raise
        shutil.rmtree(root / tag, ignore_errors=True)
        raise NoSpace(f"no space left on device while saving step {pos.step} to {root / tag}; "
                      f"{intact(spec.stage_dir)}") from None


def _save(engine, spec: TrainingSpec, pos: Position, root: Path, tag: str) -> str:
    client = {"step": pos.step, "samples": pos.samples, "fingerprint": spec.fingerprint}
    if pos.best is not None:
        client["best"] = pos.best
    if dist.is_main() and (root / tag).exists():
        # A run resumed from an older checkpoint saves this step again: what is there (damaged or cut
        # short, maybe from another world size) goes first, so it never counts as complete.
        shutil.rmtree(root / tag)
        fsync_dir(root)
    dist.barrier()
    rng_path = root / tag / f"rng-rank{dist.rank()}.pt"
    with _without_zip_crc():
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
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
        write_json(root / tag / "COMPLETE", client | {"fingerprint_any_world": spec.fingerprint_any_world,
                                                      "world_size": dist.world_size(), "time": time.time(),
                                                      "files": files})
        write_atomic(root / "LATEST", tag + "\n")
        _prune(root, spec.checkpoint.keep_last, pos.step)
        shutil.rmtree(root / UNIVERSAL, ignore_errors=True)  # a conversion this run resumed from
    return tag


@contextlib.contextmanager
def _without_zip_crc() -> Iterator[None]:
    """torch.save without the CRC-32 of each record in its zip file: COMPLETE's checksum of every file already
    finds damage, and leaving torch's out halves the time a save takes here (torch.load does not need it). The
    option came with torch 2.6; older ones save as they always did."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        yield
        return
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def load(engine, spec: Spec, saved: Saved, universal: bool) -> Position:
    """Collective. Restores model, optimizer, scheduler, this rank's RNG; returns the data position.

    `universal`: from `to_universal`'s conversion (the engine made with load_universal). At another world size
    a rank the saved run did not have keeps the dropout seed `models.seed_dropout` gave it."""
    root = ckpt_dir(spec.stage_dir)
    groups = engine.optimizer.param_groups
    own = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    path, client = engine.load_checkpoint(
        str(root / UNIVERSAL if universal else root), tag=saved.tag, load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise RuntimeError(f"{root / saved.tag}: DeepSpeed found no checkpoint to load")
    if universal:
        _mend_universal_load(engine, groups, own)
    rng = root / saved.tag / f"rng-rank{dist.rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    elif saved.world_size in (None, dist.world_size()):
        raise RuntimeError(f"{rng}: missing")
    return Position(step=int(client["step"]), samples=int(client["samples"]), best=client.get("best"))


def _mend_universal_load(engine, groups: list[dict], own: list[dict]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19), each a drift from the uninterrupted run:
    every parameter group gets the first group's settings (its weight decay to biases and norms too), and
    every group's Adam state gets one shared `step` tensor, which each optimizer step then advances once per
    group. Each group gets back its own settings, its rate where the schedule left it, and its own step."""
    for group, settings, lr in zip(groups, own, engine.lr_scheduler.get_last_lr(), strict=True):
        group.update(settings, lr=lr)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


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
