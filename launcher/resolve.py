"""Manifest -> resolved stages -> spec.json (see docs/stage-contract.md).

Derived values live here, apart from the manifest models: inherited defaults,
absolute paths, the final DeepSpeed config, data digests, and the fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.fingerprint import fingerprinted
from contract.heads import HEADS
from contract.layout import final_dir, stage_dir
from contract.sections import Data, DataSection, RefBase, RowsRef, StageBase, TrainingStage, inherit
from contract.spec import SPEC_VERSION, Spec
from launcher import datacheck, dsconfig, instances, modelcheck
from launcher.devices import processes_per_node
from launcher.digests import data_file_digest, folder_digest
from launcher.errors import ConfigError
from launcher.manifest import Loaded, flat_references

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}


@dataclass(frozen=True)
class Resolved:
    """One stage with everything inherited and checked; upstream digests come later, from the ledger."""

    index: int
    name: str
    kind: str
    nproc_per_node: int
    nnodes: int
    upstream: tuple[str, ...]  # stages whose final/ this stage reads
    base: dict[str, Any]  # the spec without run paths, fingerprint and upstream paths/digests
    ds_source: str  # where the DeepSpeed config came from, for messages
    slurm: dict[str, Any]  # sbatch settings (not part of the fingerprint: where a stage runs does not change it)
    group: str = ""  # the manifest's stage this is an instance of (its name, unless a retry attempt or variant)
    role: instances.Role = "stage"
    overrides: dict[str, Any] = field(default_factory=dict)
    rule: instances.Rule | None = None  # the stage's gate and selection (every instance holds it)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def default_run_dir(loaded: Loaded) -> Path:
    """run.dir, else runs/<run.name>; refused when it (or a folder above it) is a file."""
    run = loaded.manifest.run
    path = Path(run.dir or f"runs/{run.name}").resolve()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = loaded.where(("run", "dir") if run.dir else ("run", "name"))
                raise ConfigError(f"{where}: the run folder {path} cannot be made: {existing} is a file")
            break
    return path


def resolve(loaded: Loaded, under_slurm: bool = False) -> list[Resolved]:
    """Resolve every stage, each instance of it (`launcher.instances`); raises one ConfigError listing every
    problem. `under_slurm`: for `baton submit` and its jobs (`nproc_per_node: auto` is then slurm.gpus_per_node)."""
    out: list[Resolved] = []
    problems = instances.check_evals(loaded)
    try:
        shared = _shared_evals(loaded)
    except ConfigError as e:
        shared, problems = {}, problems + e.problems
    for i in range(len(loaded.manifest.stages)):
        try:
            rule = instances.rule(loaded, i)
            for inst in instances.instances(loaded, i):
                r = _resolve_stage(loaded, i, inst.stage, inst.name, shared, under_slurm)
                upstream = tuple(dict.fromkeys(r.upstream + (rule.reads if rule else ())))
                out.append(dataclasses.replace(r, group=inst.stage.name, role=inst.role, overrides=inst.overrides,
                                               rule=rule, upstream=upstream))
        except ConfigError as e:
            problems += [p for p in e.problems if p not in problems]
    problems += _scored_data(loaded, out)
    problems += _prepared_tokenizers(loaded)
    if problems:
        raise ConfigError(problems)
    return out


def _scored_data(loaded: Loaded, stages: list[Resolved]) -> list[str]:
    """An input holding values per row of an earlier stage's training data (`RowsRef`: a curriculum's
    difficulty.loss_of, a distill stage's teacher_logits) needs this stage to train on the data that stage scored,
    and, where the values fit only rows made alike, on rows made alike (`StageBase.training_rows`)."""
    by_name = {r.group: r for r in stages if r.role != "retry"}
    problems = []
    for r in stages:
        stage = loaded.manifest.stages[r.index]
        for name, j, ref in flat_references(stage.references()):
            scorer = by_name.get(ref.from_ or "") if isinstance(ref, RowsRef) else None
            if scorer is None:
                continue
            assert isinstance(ref, RowsRef)
            where = loaded.where(("stages", r.index, *stage.reference_key(name, j)))
            if _train_data(scorer) != _train_data(r):
                problems.append(f"{where}: stage '{scorer.name}' scored its own training data ({_shown(scorer)}), but "
                                f"this stage trains on {_shown(r)}; the {ref.holds} are per row of the same training "
                                "data")
                continue
            theirs, ours = loaded.manifest.stages[scorer.index].training_rows(), stage.training_rows()
            differ = [k for k in dict.fromkeys([*theirs, *ours]) if theirs.get(k) != ours.get(k)]
            if ref.same_rows and differ:
                k = differ[0]
                problems.append(f"{where}: stage '{scorer.name}' made its rows with {k} {theirs.get(k)}, but this "
                                f"stage's have {k} {ours.get(k)}; the {ref.holds} are per row of rows made alike")
    return problems


def _prepared_tokenizers(loaded: Loaded) -> list[str]:
    """A stage reading a prepare stage's output (data.from) must read its token ids with the tokenizer they were
    made with: compared here where both tokenizers can be traced to one origin (the same stage, local folders with
    the same vocabulary, one hub name); the stage compares the vocabularies again at start."""
    by_name = {s.name: s for s in loaded.manifest.stages}
    problems = []
    for i, stage in enumerate(loaded.manifest.stages):
        source = by_name.get(stage.data.from_ or "") if stage.data is not None else None
        if source is None or source.kind != "prepare":
            continue  # an unknown stage, or one that gives no prepared data: the reference checks say so
        ours, theirs = _tokenizer_origin(loaded, stage), _tokenizer_origin(loaded, source)
        if ours and theirs and ours[0] == theirs[0] and ours != theirs:
            problems.append(f"{loaded.where(('stages', i, 'data', 'from'))}: stage '{source.name}' tokenized its "
                            f"corpus with {theirs[2]}, but this stage's tokenizer is {ours[2]}; the token ids mean "
                            f"other tokens: give this stage the tokenizer of '{source.name}'")
    return problems


def _tokenizer_origin(loaded: Loaded, stage: StageBase, depth: int = 0) -> tuple[str, str, str] | None:
    """(what kind of origin, its identity, how messages name it) of the tokenizer a stage reads its data with: the
    tokenizer stage that trained it, a local folder's vocabulary, a hub name; None where validate cannot tell."""
    ref = stage.references().get("tokenizer")
    if ref is None:
        return ("stage", stage.name, f"stage '{stage.name}'s") if "tokenizer" in stage.outputs() else None
    assert isinstance(ref, RefBase)
    if ref.from_ is not None:
        upstream = next((s for s in loaded.manifest.stages if s.name == ref.from_), None)
        return None if upstream is None or depth > 100 else _tokenizer_origin(loaded, upstream, depth + 1)
    local = (loaded.file.parent / (ref.pretrained or "")).resolve()
    if not local.is_dir():
        return "hub", ref.pretrained or "", f"hub tokenizer {ref.pretrained}"
    vocabulary, _ = modelcheck.tokenizer_folder(str(local), folder_digest(local))
    return ("vocabulary", vocabulary, f"the tokenizer of {local}") if vocabulary else None


def _train_data(r: Resolved) -> tuple:
    data = r.base["data"]
    return tuple(data["digests"][f] for f in data["train_files"]), json.dumps(data["hub"], sort_keys=True)


def _shown(r: Resolved) -> str:
    data = r.base["data"]
    return ", ".join(Path(f).name for f in data["train_files"]) or f"hub {data['hub']['name']}"


def _shared_evals(loaded: Loaded) -> dict[str, dict[str, Any]]:
    """The manifest's shared eval sets (`evals:`), resolved as a spec's data sections are, plus their task."""
    out, problems = {}, []
    for name, s in loaded.manifest.evals.items():
        try:
            out[name] = _data(loaded, ("evals", name), s, []) | {"task": s.task}
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return out


def _resolve_stage(loaded: Loaded, i: int, stage: StageBase, name: str,
                   shared: dict[str, dict[str, Any]], under_slurm: bool = False) -> Resolved:
    m, base_dir = loaded.manifest, loaded.file.parent
    d = m.defaults
    launcher = inherit(d.launcher, stage.launcher)
    slurm = _slurm(loaded, i, stage, base_dir)
    try:
        nproc = 1 if stage.one_process else processes_per_node(launcher.nproc_per_node, slurm.get("gpus_per_node"),
                                                                under_slurm)
    except ValueError as e:
        at = ("stages", i) if "nproc_per_node" in stage.launcher.model_fields_set else ("defaults",)
        raise ConfigError(f"{loaded.where((*at, 'launcher', 'nproc_per_node'))}: {e}") from None
    nnodes = 1 if stage.one_process else launcher.nnodes
    world = nproc * nnodes
    precision = stage.precision or d.precision
    inputs, upstream = _inputs(loaded, i, stage, base_dir)
    spec: dict[str, Any] = {
        "spec_version": SPEC_VERSION,
        "run_name": m.run.name,
        "stage": name,
        "kind": stage.kind,
        "seed": stage.seed if stage.seed is not None else d.seed,
        "precision": precision,
        "world_size": world,
        "inputs": inputs,
        **_data_sections(loaded, i, stage, base_dir),
        "train": None, "checkpoint": None, "eval": None, "deepspeed": None,
        "options": stage.options(),
        "shared_evals": {n: shared[n] for n in instances.shared_sets(loaded, stage) if n in shared},
        "reporting": {"to": list(m.run.report_to), "wandb": m.run.wandb.model_dump(),
                      "mlflow": m.run.mlflow.model_dump()},
    }
    for section in spec["shared_evals"].values():
        spec["data"]["digests"] |= section["digests"]  # the plan, the ledger and `lineage` show them as data read
    ds_source = ""
    if isinstance(stage, TrainingStage):
        train = stage.train.model_dump(mode="json")
        global_batch = stage.train.micro_batch_size * stage.train.grad_accum * world
        if stage.train.global_batch_size not in (None, global_batch):
            raise ConfigError(
                f"{loaded.where(('stages', i, 'train', 'global_batch_size'))}: {stage.train.global_batch_size} but "
                f"micro_batch_size {stage.train.micro_batch_size} × grad_accum {stage.train.grad_accum} × world size "
                f"{world} (nproc_per_node {nproc} × nnodes {nnodes}) = {global_batch}"
            )
        train["global_batch_size"] = global_batch
        ds_name = inherit(d.deepspeed, stage.deepspeed).config
        own = ("stages", i, "deepspeed")
        section = own if own in loaded.lines else ("defaults", "deepspeed")
        path = dsconfig.template_path(ds_name, base_dir)
        ds_source = f"{loaded.where(section)} (stage {name}: {path.name} + overrides)"
        template = dsconfig.read_template(path, loaded.where((*section, "config")))
        merged = dsconfig.merge(dsconfig.merge(template, d.deepspeed.overrides), stage.deepspeed.overrides)
        spec |= {
            "train": train,
            "checkpoint": inherit(d.checkpoint, stage.checkpoint).model_dump(mode="json"),
            "eval": stage.eval.model_dump(mode="json"),
            "deepspeed": dsconfig.fill(merged, train, precision, world, ds_source),
            "curriculum": stage.curriculum.model_dump(mode="json") if stage.curriculum else None,
            "adapter": _adapter_section(stage),
        }
        if stage.adapter is not None and (problems := _adapter(loaded, i, stage, inputs["init"], base_dir)):
            raise ConfigError(problems)
    return Resolved(i, name, spec["kind"], nproc, nnodes, upstream, spec, ds_source, slurm, group=stage.name)


def _inputs(loaded: Loaded, i: int, stage: StageBase, base_dir: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The stage's named references as spec inputs, and the stages they come from. The models and tokenizers
    among them are looked at before anything launches (`modelcheck`): a config that transformers refuses, a
    local folder with no model or no tokenizer in it, data.max_length beyond a model's position embeddings.

    An earlier stage's output gets its path and digest in `build_spec`, once that stage is done.
    """
    inputs: dict[str, Any] = {}
    upstream: list[str] = []
    problems: list[str] = []
    models: list[tuple[Any, str]] = []  # (position embeddings, how messages name the model) of each model input
    vocabularies: dict[str, tuple[str, str]] = {}  # input -> (its local folder's vocabulary, the folder)
    refs = flat_references(stage.references())
    for name, j, ref in refs:
        at = ("stages", i, name, *(() if j is None else (j,)))
        resolved = _reference(loaded, (*at, "pretrained"), ref, base_dir)
        if j is None:
            inputs[name] = resolved
        else:
            inputs.setdefault(name, []).append(resolved)
        if ref.from_ is not None:
            upstream.append(ref.from_)
        if ref.needs == "model":
            if ref.from_ is not None:
                positions, origin = _model_of_stage(loaded, base_dir, ref.from_)
                models.append((positions, f"{name}: stage {ref.from_}, built from {origin}"))
                continue
            positions, found, what = _model(resolved, name)
            problems += [f"{loaded.where((*at, *key))}: {message}" for key, message in found]
            models.append((positions, what))
            if j is None and resolved["digest"] is not None and modelcheck.holds_tokenizer(resolved["path"]):
                vocabulary, _ = modelcheck.tokenizer_folder(resolved["path"], resolved["digest"])
                if vocabulary:
                    vocabularies[name] = (vocabulary, resolved["path"])
        elif ref.needs == "tokenizer" and resolved["digest"] is not None:  # a local folder (hub names: left alone)
            vocabulary, why = modelcheck.tokenizer_folder(resolved["path"], resolved["digest"])
            if vocabulary:
                vocabularies[name] = (vocabulary, resolved["path"])
            # a tokenizer the manifest does not name is the folder of another input (TrainingStage: init's)
            lent = [n for n, k, r in refs if k is None and n != name and n in stage.model_fields_set
                    and r.pretrained == ref.pretrained]
            if why and name not in stage.model_fields_set and lent:
                problems.append(f"{loaded.where(('stages', i, lent[0], 'pretrained'))}: {why}; {name} defaults to "
                                f"this folder: give {name}.pretrained or {name}.from")
            elif why:
                problems.append(f"{loaded.where((*at, 'pretrained'))}: {why}")
    for a, b in stage.same_vocabulary:
        if a in vocabularies and b in vocabularies and vocabularies[a][0] != vocabularies[b][0]:
            key = ("stages", i, b) if b in stage.model_fields_set else ("stages", i, a)
            problems.append(f"{loaded.where((*key, 'pretrained'))}: {a} ({vocabularies[a][1]}) and {b} "
                            f"({vocabularies[b][1]}) hold different tokenizers (other tokens, ids or special tokens); "
                            f"{a} must read the token ids {b} gives: give {b} the folder of {a}'s own tokenizer")
    if modelcheck.max_length_applies(stage.options()):
        for section in stage.data_sections():
            length = ("stages", i, *section.path, "max_length")
            for positions, what in models:
                why = modelcheck.too_long(section.data.max_length, length not in loaded.lines, positions, what)
                if why:
                    problems.append(f"{loaded.where(length)}: {why}")
    if problems:
        raise ConfigError(problems)
    return inputs, tuple(dict.fromkeys(upstream))


def _reference(loaded: Loaded, where: tuple, ref: RefBase, base_dir: Path) -> dict[str, Any]:
    if ref.from_ is not None:
        return {"source": "stage", "stage": ref.from_, "path": None, "digest": None, "config": None}
    if ref.pretrained is not None:
        local = (base_dir / ref.pretrained).resolve()
        if local.is_dir():
            return {"source": "pretrained", "stage": None, "path": str(local), "digest": folder_digest(local),
                    "config": None}
        if ref.pretrained.startswith((".", "/")):
            raise ConfigError(f"{loaded.where(where)}: local folder not found: {local}")
        return {"source": "pretrained", "stage": None, "path": ref.pretrained, "digest": None, "config": None}
    config = getattr(ref, "config", None)
    assert config is not None, "the reference models require one source"
    return {"source": "config", "stage": None, "path": None, "digest": None, "config": dict(config)}


def _model(resolved: dict[str, Any], name: str) -> tuple[Any, list[tuple[tuple[str, ...], str]], str]:
    """A model input built from a config or read from a folder: its position embeddings as far as validate can
    know them (None: a hub name, never looked up, or a config that is refused), its problems (with their key
    below the reference) and how messages name it."""
    if resolved["source"] == "config":
        positions, found = modelcheck.config(resolved["config"])
        return positions, [(("config", *key), message) for key, message in found], f"{name}.config"
    if resolved["digest"] is None:
        return None, [], f"{name} {resolved['path']}"
    positions, problems = modelcheck.model_folder(resolved["path"], resolved["digest"])
    return positions, [(("pretrained",), message) for message in problems], f"{name} folder {resolved['path']}"


def _model_of_stage(loaded: Loaded, base_dir: Path, name: str) -> tuple[Any, str]:
    """The position embeddings of the model an earlier stage hands on (those of the model it started from) and
    where that comes from; (None, "") where validate cannot know them. Its problems are reported for that stage."""
    found = _origin(loaded, base_dir, name)
    if found is None:
        return None, ""
    stage, input_name, resolved = found
    positions, _, what = _model(resolved, input_name)
    return positions, f"stage {stage}'s {what}"


def _origin(loaded: Loaded, base_dir: Path, name: str) -> tuple[str, str, dict[str, Any]] | None:
    """The model an earlier stage `name` started from, followed up the stages it came from: (the stage that reads
    it, its input name, the resolved input); None where there is no one such model."""
    stage = next(s for s in loaded.manifest.stages if s.name == name)
    models = [(n, ref) for n, _, ref in flat_references(stage.references()) if ref.needs == "model"]
    if len(models) != 1:
        return None
    input_name, ref = models[0]
    if ref.from_ is not None:
        return _origin(loaded, base_dir, ref.from_)
    try:
        return name, input_name, _reference(loaded, (), ref, base_dir)
    except ConfigError:
        return None


def _adapter_section(stage: TrainingStage) -> dict[str, Any] | None:
    """The stage's adapter section for spec.json; a continued adapter's shape (r, alpha …) is left out: it comes
    with the adapter (inputs.adapter, counted by its digest)."""
    if stage.adapter is None:
        return None
    shape = set(stage.adapter.SHAPE) if stage.adapter.from_ is not None else set()
    return stage.adapter.model_dump(mode="json", exclude=shape)


def _adapter(loaded: Loaded, i: int, stage: TrainingStage, init: dict[str, Any], base_dir: Path) -> list[str]:
    """What validate can tell of a stage's adapter before launch: QLoRA (which needs a CUDA device, and whose
    training path is not built yet); target_modules and
    modules_to_save that name no module of the model it trains (where that model is known: a config, a local
    folder, or what an earlier stage started from)."""
    adapter = stage.adapter
    assert adapter is not None
    at = ("stages", i, "adapter")
    problems = []
    if adapter.quantize is not None:
        problems.append(f"{loaded.where((*at, 'quantize'))}: {modelcheck.quantize_problem()}")
    if adapter.target_modules is None and adapter.modules_to_save is None:
        return problems
    source: dict[str, Any] | None = init
    if init["source"] == "stage":
        found = _origin(loaded, base_dir, init["stage"])
        source = found[2] if found else None
    head = stage.model_head()
    names = source and modelcheck.module_names(source, HEADS[head].model if head else "AutoModel")
    if not names or source is None:
        return problems
    model = f"a {source['config']['model_type']} config" if source["source"] == "config" else source["path"]
    for key in ("target_modules", "modules_to_save"):
        missing = modelcheck.unmatched(getattr(adapter, key) or [], names)
        if missing:
            problems.append(f"{loaded.where((*at, key))}: {', '.join(missing)} names no module of the model ({model}); "
                            f"its modules are named {modelcheck.short_names(names)}")
    return problems


def _slurm(loaded: Loaded, i: int, stage: StageBase, base_dir: Path) -> dict[str, Any]:
    defaults = loaded.manifest.defaults.slurm
    merged = inherit(defaults, stage.slurm).model_dump(exclude_none=True)
    own = stage.slurm.model_fields_set
    if "preamble" in merged:
        path = (base_dir / merged["preamble"]).resolve()
        if not path.is_file():
            where = ("stages", i, "slurm", "preamble") if "preamble" in own else ("defaults", "slurm", "preamble")
            raise ConfigError(f"{loaded.where(where)}: preamble file not found: {path}")
        merged["preamble"] = str(path)
    return merged


def _data_sections(loaded: Loaded, i: int, stage: StageBase, base_dir: Path) -> dict[str, Any]:
    """spec.data and spec.sections from the stage's data sections (its `data:`, or those its kind declares).

    A kind without a `data:` of its own gets a spec.data without files; its digests list every section's files,
    so the plan, the ledger and `lineage` show them as the stage's data inputs like any other."""
    out: dict[str | None, dict[str, Any]] = {}
    problems: list[str] = []
    for section in stage.data_sections():
        numbers = _difficulty_column(stage) if section.name is None else []
        try:
            labels = (datacheck.Labels(section.data.label_field, section.data.labels, stage.unlabelled_rows)
                      if _labelled(stage, section) else None)
            out[section.name] = _data(loaded, ("stages", i, *section.path), section.data, numbers, labels)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    main = out.pop(None, None)
    if main is None:
        main = _no_files(Data.model_construct())  # the defaults; no train, no hub: this stage reads no data: section
        main["digests"] = {f: d for section in out.values() for f, d in section["digests"].items()}
    return {"data": main, "sections": out}


def _no_files(data: Data) -> dict[str, Any]:
    """Spec data that names no file: a stage that reads no data: section, or reads a prepare stage's output (its
    inputs.data: the prepared folder, by its digest)."""
    return {"train_files": [], "eval_files": [], "format": None, "hub": None, "text_field": data.text_field,
            "text_pair_field": None, "label_field": data.label_field, "labels": None,
            "max_length": data.max_length, "digests": {}}


def _labelled(stage: StageBase, section: DataSection) -> bool:
    """Whether a data section feeds a classifier (its rows need labels): a multitask task of type classify, or
    the data of a stage whose head (or task) classifies."""
    head = section.head or stage.model_head() or stage.options().get("task")
    return not section.unlabelled and head in HEADS and HEADS[head].classes == "num_labels"


def _data(loaded: Loaded, at: tuple[str | int, ...], data: Data, numbers: list[str],
          labels: datacheck.Labels | None = None) -> dict[str, Any]:
    """A data section as spec data: files made absolute, the format, each file checked (with `labels`, a
    classifier's: every row's label) and its digest."""
    base_dir = loaded.file.parent
    if data.from_ is not None:
        if at[-1:] != ("data",) or at[:1] != ("stages",) or len(at) != 3:
            raise ConfigError(f"{loaded.where((*at, 'from'))}: only a stage's own data: reads a prepare stage")
        return _no_files(data)
    files = {k: [str((base_dir / f).resolve()) for f in ([v] if isinstance(v, str) else v or [])]
             for k, v in (("train", data.train), ("eval", data.eval))}
    fmt: str | None = data.format
    if fmt == "auto" and data.hub is None:
        found = {FORMATS.get(Path(f).suffix.lower()) for f in files["train"] + files["eval"]}
        if None in found or len(found) != 1:
            raise ConfigError(
                f"{loaded.where(at)}: cannot tell the format from the file extensions "
                f"({', '.join(Path(f).suffix or '<none>' for f in files['train'] + files['eval'])}); "
                f"set data.format to one of json, csv, parquet, text"
            )
        fmt = found.pop()
    if data.hub is None and fmt is not None:
        fields = [] if fmt == "text" else [f for f in (data.text_field, data.text_pair_field) if f]
        problems = [f"{loaded.where((*at, split))}: {problem}"
                    for split, problem in datacheck.check(files, fmt, fields, numbers, labels)]
        if problems:
            raise ConfigError(problems)
    hub = None
    if data.hub is not None:
        hub = {"name": data.hub, "config": data.hub_config, "train_split": data.train_split,
               "eval_split": data.eval_split}
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
        "digests": {f: data_file_digest(f) for f in files["train"] + files["eval"]},
    }


def _difficulty_column(stage: StageBase) -> list[str]:
    """The numeric column a curriculum ranks the training examples by, if any."""
    curriculum = getattr(stage, "curriculum", None)
    column = curriculum.difficulty.column if curriculum and curriculum.difficulty else None
    return [column] if column else []


# ----------------------------------------------------------------- spec and fingerprint


def build_spec(r: Resolved, run_dir: Path, outputs: dict[str, dict[str, str]]) -> Spec | None:
    """The spec.json of a stage, or None while an upstream stage has no output yet.

    `outputs` maps a manifest stage's name to {"digest", "instance", …} of what it hands on: its own final/, or
    that of the retry attempt, variant or fallback stage its decisions chose (`launcher.decisions`).
    """
    spec = json.loads(json.dumps(r.base))
    for value in spec["inputs"].values():
        for ref in value if isinstance(value, list) else [value]:
            if ref["source"] == "stage":
                out = outputs.get(ref["stage"])
                if out is None:
                    return None
                # the folder as it is now (a run folder may have moved); the digest as the ledger recorded it
                instance = out.get("instance", ref["stage"])
                ref["path"], ref["digest"] = str(final_dir(stage_dir(run_dir, instance))), out["digest"]
                if instance != ref["stage"]:
                    ref["stage"], ref["named"] = instance, ref["stage"]
    spec["stage_dir"] = str(stage_dir(run_dir, r.name))
    spec["cache_dir"] = str(run_dir / "cache")
    spec["fingerprint"] = spec["fingerprint_any_world"] = ""
    made = Spec.model_validate(spec)
    s = settings(made)
    return made.model_copy(update={"fingerprint": fingerprint(s), "fingerprint_any_world": fingerprint_any_world(s)})


def settings(spec: Spec) -> dict[str, Any]:
    """What decides a stage's result: its spec as the fields' markers count it (`contract.fingerprint`): without
    places on disk, bookkeeping, logging and reporting; inputs and data files by digest, not by path (a moved
    data file with the same bytes changes nothing)."""
    return fingerprinted(spec)


# What may differ between a checkpoint and the stage resuming it at another world size
# (checkpoint.on_world_size_change: resume): how the global batch is cut, not what is trained.
WORLD_SHAPE = {"": ("world_size",), "train": ("micro_batch_size", "grad_accum", "global_batch_size"),
               "deepspeed": ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}


def fingerprint(s: dict[str, Any]) -> str:
    """Of a stage's `settings`."""
    blob = json.dumps(s, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def fingerprint_any_world(s: dict[str, Any]) -> str:
    """Of a stage's `settings` without the world size and the batch shape."""
    s = json.loads(json.dumps(s))
    for section, keys in WORLD_SHAPE.items():
        part = s.get(section) if section else s
        if isinstance(part, dict):
            for key in keys:
                part.pop(key, None)
    return fingerprint(s)
