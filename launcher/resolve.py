"""Manifest -> resolved stages -> spec.json (see docs/stage-contract.md).

Derived values live here, apart from the manifest models: inherited defaults,
absolute paths, the final DeepSpeed config, data digests, and the fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import dsconfig
from launcher.errors import ConfigError
from launcher.files import dir_digest, file_digest
from launcher.manifest import ClassifyStage, Loaded, MlmStage, ModelStage, TokenizerStage

SPEC_VERSION = 1
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}
DEFAULT_SEED = 1234
DEFAULT_DS = "zero2"


@dataclass(frozen=True)
class Resolved:
    """One stage with everything inherited and checked; upstream digests come later, from the ledger."""

    index: int
    name: str
    kind: str
    nproc_per_node: int
    nnodes: int
    upstream: tuple[str, ...]  # stages whose final/ this stage reads
    base: dict[str, Any]  # the spec without run paths and upstream digests
    ds_source: str  # where the DeepSpeed config came from, for messages
    slurm: dict[str, Any]  # sbatch settings (not part of the fingerprint: where a stage runs does not change it)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def default_run_dir(loaded: Loaded) -> Path:
    run = loaded.manifest.run
    return Path(run.dir or f"runs/{run.name}").resolve()


def resolve(loaded: Loaded) -> list[Resolved]:
    """Resolve every stage; raises one ConfigError listing every problem."""
    out, problems = [], []
    for i, stage in enumerate(loaded.manifest.stages):
        try:
            out.append(_resolve_stage(loaded, i, stage))
        except ConfigError as e:
            problems += [p for p in e.problems if p not in problems]
    if problems:
        raise ConfigError(problems)
    return out


def _resolve_stage(loaded: Loaded, i: int, stage: TokenizerStage | MlmStage | ClassifyStage) -> Resolved:
    m, base_dir = loaded.manifest, loaded.file.parent
    d = m.defaults
    seed = stage.seed if stage.seed is not None else (d.seed if d.seed is not None else DEFAULT_SEED)
    precision = stage.precision or d.precision or "fp32"
    if isinstance(stage, TokenizerStage):
        nproc, nnodes = 1, 1  # SentencePiece trains in one process
    else:
        nproc = stage.launcher.nproc_per_node or d.launcher.nproc_per_node or 1
        nnodes = stage.launcher.nnodes or d.launcher.nnodes or 1
    world = nproc * nnodes
    spec: dict[str, Any] = {
        "spec_version": SPEC_VERSION,
        "run_name": m.run.name,
        "stage": stage.name,
        "kind": stage.kind,
        "seed": seed,
        "precision": precision,
        "world_size": world,
        "data": _data(loaded, i, stage, base_dir),
    }
    upstream: list[str] = []
    ds_source = ""
    if isinstance(stage, TokenizerStage):
        spec |= {"init": None, "tokenizer": None, "train": None, "checkpoint": None, "eval": None, "deepspeed": None,
                 "options": stage.sentencepiece.model_dump()}
    else:
        train = stage.train.model_dump()
        train["betas"] = list(train["betas"])
        global_batch = stage.train.micro_batch_size * stage.train.grad_accum * world
        if stage.train.global_batch_size not in (None, global_batch):
            raise ConfigError(
                f"{loaded.where(('stages', i, 'train', 'global_batch_size'))}: {stage.train.global_batch_size} but "
                f"micro_batch_size {stage.train.micro_batch_size} × grad_accum {stage.train.grad_accum} × world size "
                f"{world} (nproc_per_node {nproc} × nnodes {nnodes}) = {global_batch}"
            )
        train["global_batch_size"] = global_batch
        ds_name = stage.deepspeed.config or d.deepspeed.config or DEFAULT_DS
        section = ("stages", i, "deepspeed") if ("stages", i, "deepspeed") in loaded.lines else ("defaults", "deepspeed")
        where = loaded.where((*section, "config"))
        path = dsconfig.template_path(ds_name, base_dir)
        ds_source = f"{loaded.where(section)} (stage {stage.name}: {path.name} + overrides)"
        template = dsconfig.read_template(path, where)
        merged = dsconfig.merge(dsconfig.merge(template, d.deepspeed.overrides), stage.deepspeed.overrides)
        spec |= {
            "init": (init := _init(loaded, i, stage, base_dir)),
            "tokenizer": _tokenizer(loaded, i, stage, base_dir, init),
            "train": train,
            "checkpoint": stage.checkpoint.model_dump(),
            "eval": stage.eval.model_dump(),
            "options": stage.mlm.model_dump() if isinstance(stage, MlmStage) else {},
            "deepspeed": dsconfig.fill(merged, train, precision, world, ds_source),
        }
        upstream = [r.from_ for r in (stage.init, stage.tokenizer) if r is not None and r.from_ is not None]
    slurm = _slurm(loaded, i, stage, base_dir)
    return Resolved(i, stage.name, stage.kind, nproc, nnodes, tuple(dict.fromkeys(upstream)), spec, ds_source, slurm)


SLURM_DEFAULTS = {"signal_before_s": 120, "max_requeues": 3}


def _slurm(loaded: Loaded, i: int, stage: Any, base_dir: Path) -> dict[str, Any]:
    own = stage.slurm.model_dump(exclude_none=True)
    merged = SLURM_DEFAULTS | loaded.manifest.defaults.slurm.model_dump(exclude_none=True) | own
    if "preamble" in merged:
        path = (base_dir / merged["preamble"]).resolve()
        if not path.is_file():
            where = ("stages", i, "slurm", "preamble") if "preamble" in own else ("defaults", "slurm", "preamble")
            raise ConfigError(f"{loaded.where(where)}: preamble file not found: {path}")
        merged["preamble"] = str(path)
    return merged


def _data(loaded: Loaded, i: int, stage: Any, base_dir: Path) -> dict[str, Any]:
    data = stage.data
    files = {k: [str((base_dir / f).resolve()) for f in ([v] if isinstance(v, str) else v or [])]
             for k, v in (("train", data.train), ("eval", data.eval))}
    fmt = data.format
    if fmt == "auto" and data.hub is None:
        found = {FORMATS.get(Path(f).suffix.lower()) for f in files["train"] + files["eval"]}
        if None in found or len(found) != 1:
            raise ConfigError(
                f"{loaded.where(('stages', i, 'data'))}: cannot tell the format from the file extensions "
                f"({', '.join(Path(f).suffix or '<none>' for f in files['train'] + files['eval'])}); "
                f"set data.format to one of json, csv, parquet, text"
            )
        fmt = found.pop()
    hub = None
    if data.hub is not None:
        hub = {"name": data.hub, "config": data.hub_config, "train_split": data.train_split, "eval_split": data.eval_split}
    if isinstance(stage, ClassifyStage) and data.labels is not None and len(set(data.labels)) != len(data.labels):
        raise ConfigError(f"{loaded.where(('stages', i, 'data', 'labels'))}: labels repeat")
    return {
        "train_files": files["train"],
        "eval_files": files["eval"],
        "format": fmt if data.hub is None else None,
        "hub": hub,
        "text_field": "text" if fmt == "text" else data.text_field,
        "text_pair_field": data.text_pair_field,
        "label_field": data.label_field,
        "labels": data.labels,
        "max_length": data.max_length,
        "digests": {f: _file_digest(f) for f in files["train"] + files["eval"]},
    }


def _file_digest(path: str) -> str:
    """A data file is hashed once however many stages read it (keyed by its stat, so an edit is seen)."""
    st = Path(path).stat()
    return _digest_of(path, st.st_size, st.st_mtime_ns)


@functools.cache
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(Path(path))


def _local_or_hub(name: str, base_dir: Path) -> tuple[str, str | None]:
    """A path that exists locally (relative to the manifest) is used with its digest; otherwise a hub name."""
    local = (base_dir / name).resolve()
    if local.is_dir():
        return str(local), dir_digest(local)
    if name.startswith((".", "/")):
        raise ConfigError(f"local folder not found: {local}")
    return name, None


def _init(loaded: Loaded, i: int, stage: ModelStage, base_dir: Path) -> dict[str, Any]:
    init = stage.init
    if init.from_ is not None:
        return {"source": "stage", "stage": init.from_, "path": None, "digest": None, "config": None}
    if init.pretrained is not None:
        try:
            path, digest = _local_or_hub(init.pretrained, base_dir)
        except ConfigError as e:
            raise ConfigError(f"{loaded.where(('stages', i, 'init', 'pretrained'))}: {e}") from None
        return {"source": "pretrained", "stage": None, "path": path, "digest": digest, "config": None}
    return {"source": "config", "stage": None, "path": None, "digest": None, "config": dict(init.config or {})}


def _tokenizer(loaded: Loaded, i: int, stage: ModelStage, base_dir: Path, init: dict[str, Any]) -> dict[str, Any]:
    ref = stage.tokenizer
    if ref is None:  # the tokenizer saved with the init model (its folder is hashed once, for init)
        return {k: init[k] for k in ("source", "stage", "path", "digest")}
    if ref.from_ is not None:
        return {"source": "stage", "stage": ref.from_, "path": None, "digest": None}
    try:
        path, digest = _local_or_hub(ref.pretrained or "", base_dir)
    except ConfigError as e:
        raise ConfigError(f"{loaded.where(('stages', i, 'tokenizer', 'pretrained'))}: {e}") from None
    return {"source": "pretrained", "stage": None, "path": path, "digest": digest}


# ----------------------------------------------------------------- spec and fingerprint


def stage_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "stages" / name


def build_spec(r: Resolved, run_dir: Path, outputs: dict[str, dict[str, str]]) -> dict[str, Any] | None:
    """The spec.json of a stage, or None while an upstream stage has no output yet.

    `outputs` maps a finished stage's name to {"digest", …} of its final/.
    """
    spec = json.loads(json.dumps(r.base))
    for key in ("init", "tokenizer"):
        ref = spec[key]
        if ref is not None and ref["source"] == "stage":
            out = outputs.get(ref["stage"])
            if out is None:
                return None
            # the folder as it is now (a run folder may have moved); the digest as the ledger recorded it
            ref["path"], ref["digest"] = str(stage_dir(run_dir, ref["stage"]) / "final"), out["digest"]
    spec["stage_dir"] = str(stage_dir(run_dir, r.name))
    spec["cache_dir"] = str(run_dir / "cache")
    spec["fingerprint"] = fingerprint(spec)
    return spec


def settings(spec: dict[str, Any]) -> dict[str, Any]:
    """What decides a stage's result: its spec without places on disk and without bookkeeping.

    Inputs count by digest, not by path (a moved data file with the same bytes changes
    nothing); checkpoint frequency and logging do not change what is trained.
    """
    s = json.loads(json.dumps(spec))
    for key in ("run_name", "stage", "stage_dir", "cache_dir", "fingerprint", "checkpoint"):
        s.pop(key, None)
    data = s["data"]
    data["train"] = [data["digests"][f] for f in data.pop("train_files")]
    data["eval"] = [data["digests"][f] for f in data.pop("eval_files")]
    data.pop("digests")
    for key in ("init", "tokenizer"):
        ref = s.get(key)
        if ref and ref.get("digest"):
            ref.pop("path")  # the digest says it all
    if s.get("train"):
        s["train"].pop("log_every")
    return s


def fingerprint(spec: dict[str, Any]) -> str:
    blob = json.dumps(settings(spec), sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
