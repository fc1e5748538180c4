"""Datasets: load and tokenize once per run (cached), and a deterministic, restorable sample order.

The order is one global stream, the concatenation of per-epoch permutations
seeded by (seed, epoch). Optimizer step s consumes stream items
[s·G, (s+1)·G) for global batch G; within it micro-step k gives rank r the
slice at k·M·W + r·M (micro batch M, world size W). The position is therefore
just "samples consumed", and a resumed run sees exactly the samples an
uninterrupted run would have.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import traceback
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from contract.files import digest
from contract.spec import DataSpec
from stages.runtime import dist
from stages.runtime.spec import Spec, SpecError

_BUILDERS = {"json": "json", "csv": "csv", "parquet": "parquet", "text": "text"}
# A row longer than max_length × CHARS_PER_TOKEN characters is cut (at white space) before the tokenizer sees it:
# no token of the tokenizers in use is that long (WordPiece gives up on a word of 100), so the cut row gives the
# first max_length tokens of the whole one, and a 100 MB row costs what a short one does.
CHARS_PER_TOKEN = 128


def load_raw(spec: Spec, *, train: bool = True) -> dict[str, Any]:
    """{"train": Dataset, "eval": Dataset | None} of spec.data; rank 0 fills the datasets cache first. train=False: a
    stage that only evaluates (ensemble): {"train": None, "eval": …}."""
    return load_section(spec.data, spec.cache_dir, train=train)


def load_section(section: DataSpec, cache_dir: str, *, train: bool = True, key: str = "data") -> dict[str, Any]:
    """`load_raw` of any data section, which errors name `key`."""
    with rank0_first():
        return _load_raw(section, os.path.join(cache_dir, "datasets"), train, key)


def load_eval(data: DataSpec, cache_dir: str, key: str) -> Any:
    """The eval split (a Dataset) of `data`, a section with eval data only (a shared eval set), which errors name
    `key`; rank 0 fills the datasets cache under cache_dir first."""
    with rank0_first():
        ds = _load_raw(data, os.path.join(cache_dir, "datasets"), train=False, key=key)["eval"]
    if ds is None or len(ds) == 0:
        raise SpecError(f"{key}: no eval rows (eval_files {data.eval_files}"
                        + (f", hub {data.hub.name} split {data.hub.eval_split}" if data.hub else "") + ")")
    return ds


def _load_raw(data: DataSpec, cache_dir: str, train: bool = True, key: str = "data") -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()
    if data.hub is not None:
        hub = data.hub
        try:
            load = lambda split: datasets.load_dataset(hub.name, hub.config, split=split, cache_dir=cache_dir)  # noqa: E731
            return {"train": load(hub.train_split) if train else None,
                    "eval": load(hub.eval_split) if hub.eval_split else None}
        except Exception as e:  # datasets raises many types for "not found / offline"
            raise SpecError(f"{key}.hub: cannot load {hub.name!r}: {type(e).__name__}: {e}") from None
    for field, files in (("train_files", data.train_files), ("eval_files", data.eval_files)):
        for path in files:
            if not os.path.isfile(path):
                raise SpecError(f"{key}.{field}: {path}: no such file")
    if train and not data.train_files:
        raise SpecError(f"{key}.train_files: empty and no {key}.hub")
    split_files = {"train": data.train_files} if train else {}
    split_files |= {"eval": data.eval_files} if data.eval_files else {}
    if not split_files:
        return {"train": None, "eval": None}
    if data.format is None:
        raise SpecError(f"{key}.format: null without {key}.hub")
    ds = datasets.load_dataset(_BUILDERS[data.format], data_files=split_files, cache_dir=cache_dir)
    for split, d in ds.items():
        if data.text_field not in d.column_names:
            raise SpecError(f"{key}.text_field: column {data.text_field!r} not in {split_files[split]} "
                            f"(columns: {d.column_names})")
    return {"train": ds.get("train"), "eval": ds.get("eval")}


def tokenize(spec: Spec, raw: dict[str, Any], tokenizer, tokenizer_digest: str) -> dict[str, Any]:
    """Token ids per split of spec.data (no padding: batches pad to their longest row), cached under cache_dir."""
    c = spec.curriculum
    difficulty = [c.difficulty.column] if c and c.difficulty and c.difficulty.column else []
    return tokenize_data(spec.data, spec.cache_dir, raw, tokenizer, tokenizer_digest, difficulty)


def tokenize_data(data: DataSpec, cache_dir: str, raw: dict[str, Any], tokenizer, tokenizer_digest: str,
                  difficulty: Sequence[str] = ()) -> dict[str, Any]:
    """`tokenize` of any data section (a shared eval set's too): each split keeps its label column, and the
    `difficulty` column (a curriculum's) where given."""
    out_dir = Path(cache_dir, "tokenized")
    keep = [c for c in tokenizer.model_input_names if c != "attention_mask"]

    bound = data.max_length * CHARS_PER_TOKEN

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts, pairs = batch[data.text_field], batch[data.text_pair_field] if data.text_pair_field else None
        # a pair is cut only where one side is long: with both long, which side is longer decides the truncation
        long = [len(t) > bound and (pairs is None or len(pairs[i]) <= bound) for i, t in enumerate(texts)]
        long_pair = [len(p) > bound and len(texts[i]) <= bound for i, p in enumerate(pairs or [])]
        cut = [_clip(t, bound) if c else t for t, c in zip(texts, long, strict=True)]
        cut_pairs = None if pairs is None else \
            [_clip(p, bound) if c else p for p, c in zip(pairs, long_pair, strict=True)]
        enc = tokenizer(cut, cut_pairs, truncation=True, max_length=data.max_length)
        # a cut row whose tokens fell short of max_length may have lost some (a word longer than the cut): whole
        redo = [i for i, ids in enumerate(enc["input_ids"])
                if (long[i] or (long_pair and long_pair[i])) and len(ids) < data.max_length]
        if redo:
            again = tokenizer([texts[i] for i in redo], None if pairs is None else [pairs[i] for i in redo],
                              truncation=True, max_length=data.max_length)
            for k in keep:
                if k in enc:
                    for j, i in enumerate(redo):
                        enc[k][i] = again[k][j]
        return {k: enc[k] for k in keep if k in enc}

    out: dict[str, Any] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, ds in raw.items():
        if ds is None:
            out[split] = None
            continue
        check_text(ds, data, split)
        kept = [data.label_field, *difficulty]  # the label, and a curriculum's difficulty column
        key = cache_key(tokenizer_digest, ds._fingerprint, data.text_field, data.text_pair_field,
                        data.max_length, keep, *([kept] if difficulty else []))
        out[split] = map_by_rank(ds, encode, key=key, path=out_dir / f"{split}-{key}",
                                 remove_columns=[c for c in ds.column_names if c not in kept])
    return out


def _clip(text: str, bound: int) -> str:
    """`text` cut to at most `bound` characters, at the last white space before it (where there is one in its
    second half): the words kept are whole, so they give the tokens the whole text begins with."""
    space = max(text.rfind(c, 0, bound) for c in " \n\t")
    return text[:space] if space > bound // 2 else text[:bound]


def check_text(ds, data: DataSpec, split: str, key: str = "data") -> None:
    """SpecError naming the file and row of the first row whose text (or text pair) is null or not a string: what
    the tokenizer would otherwise meet as a TypeError in some rank's share. Nulls are found in Arrow, without
    reading the rows into Python."""
    import pyarrow.compute as pc

    for field in filter(None, (data.text_field, data.text_pair_field)):
        if field not in ds.column_names:
            continue
        if getattr(ds.features[field], "dtype", None) in ("string", "large_string"):
            column = ds.data.column(field)
            if column.null_count:
                row = pc.index(pc.is_null(column), True).as_py()
                raise SpecError(f"{key}: {locate(data, split, row)}: {field} is null; every row needs its text")
            continue
        for row, value in enumerate(ds[field]):  # a column of another type, or of mixed types (JSON values)
            if not isinstance(value, str):
                what = "null; every row needs its text" if value is None else f"{json.dumps(value)}, not a string"
                raise SpecError(f"{key}: {locate(data, split, row)}: {field} is {what}")


def locate(data: DataSpec, split: str, index: int) -> str:
    """`<file>: row <n>`: where row `index` of a split (its files one after another) is; for hub data, the split's
    row."""
    files = data.train_files if split == "train" else data.eval_files
    for path in files:
        n = _rows(path, data.format)
        if n is None:
            break
        if index < n:
            return f"{path}: row {index + 1}"
        index -= n
    return f"{split} row {index + 1}" if not files else f"{split} row {index + 1} of {', '.join(files)}"


def _rows(path: str, fmt: str | None) -> int | None:
    """How many rows `datasets` reads from one file (None: a format counted here cannot be)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        text = Path(path).read_text(encoding="utf-8")
        if fmt == "csv":
            return max(sum(1 for _ in csv.reader(text.splitlines())) - 1, 0)
        if fmt == "json" and text.lstrip()[:1] == "[":
            return len(json.loads(text))
        return sum(1 for line in text.splitlines() if line.strip())
    except (OSError, ValueError, ImportError):
        return None


def map_by_rank(ds, fn: Callable[[dict[str, list]], dict[str, list]], *, key: str, path: Path, **map_args) -> Any:
    """Collective. `ds.map(fn, batched=True, **map_args)`, cached in files `<path>-<i>of<n>.arrow`: each rank maps a
    contiguous share of the rows at once (tokenizing takes 1/n of the time), then every rank reads all the shares in
    row order: the same rows as one map. A complete set of shares already cached is read as it is, whatever world
    size made it (a resume on other nodes). A rank that fails raises its error; the others stop too, with a
    pointer to it, instead of waiting for it."""
    import datasets

    # Rank 0's view decides, so that every rank reads the same set.
    shares = dist.all_gather_objects(_cached_shares(path))[0] or (
        dist.world_size() if len(ds) >= dist.world_size() else 1)

    def share(i: int) -> Any:
        return ds.shard(num_shards=shares, index=i, contiguous=True).map(
            fn, batched=True, new_fingerprint=f"{key}-{i}of{shares}", cache_file_name=f"{path}-{i}of{shares}.arrow",
            **map_args)

    error: BaseException | None = None
    if dist.rank() < shares:
        try:
            share(dist.rank())
        except (Exception, MemoryError) as e:  # noqa: BLE001 - raised below, after the other ranks know
            error = e
            traceback.print_exc()  # kept in this rank's log; every rank's message below names it and says why
    if dist.any_rank(error is not None):
        if isinstance(error, SpecError):
            raise error
        said = dist.all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        failed = next(r for r, what in enumerate(said) if what is not None)
        start, end = _share_rows(len(ds), shares, failed)
        raise SpecError(f"data: rank {failed} failed to tokenize its share (rows {start + 1}-{end} of {len(ds)}): "
                        f"{' '.join(str(said[failed]).split())[:500]}") from error
    return datasets.concatenate_datasets([share(i) for i in range(shares)]) if shares > 1 else share(0)


def _share_rows(n: int, shares: int, index: int) -> tuple[int, int]:
    """[start, end) of share `index` of n rows, as `Dataset.shard(contiguous=True)` cuts them."""
    div, mod = divmod(n, shares)
    start = div * index + min(index, mod)
    return start, start + div + (index < mod)


def _cached_shares(path: Path) -> int | None:
    """n where every share file `<path>-<i>of<n>.arrow` exists (datasets moves a cache file into place once it is
    whole), else None."""
    pattern = re.compile(rf"{re.escape(path.name)}-\d+of(\d+)\.arrow")
    counts = {int(m[1]) for f in path.parent.glob(f"{path.name}-*") if (m := pattern.fullmatch(f.name))}
    return next((n for n in sorted(counts) if all(Path(f"{path}-{i}of{n}.arrow").is_file() for i in range(n))), None)


def tokenizer_digest(spec: Spec, name: str = "tokenizer") -> str:
    """What identifies the tokenizer of input `name` in cache keys."""
    ref = spec.ref(name)
    if ref.digest:
        return ref.digest
    path = ref.path or ""
    return digest(path) if os.path.exists(path) else path


def cache_key(*parts: Any) -> str:
    """A short hash of what decides a cached file's content (for datasets' cache_file_name and fingerprint)."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


class rank0_first:
    """Rank 0 runs the block first (filling caches), the others then read what it wrote."""

    def __enter__(self):
        if not dist.is_main():
            dist.barrier()

    def __exit__(self, exc_type, exc, tb):
        # On an exception the other ranks fail the same way on their own turn, or time out; no barrier then.
        if exc_type is None and dist.is_main():
            dist.barrier()


def collate(ds, indices: Sequence[int], pad_id: int, max_length: int | None = None,
            ends: Collection[int] = ()) -> dict[str, torch.Tensor]:
    """Rows `indices` of a tokenized split, padded to the longest; attention_mask from the lengths.

    `max_length` (a curriculum phase's) cuts longer rows at batch time: their first max_length - 1 tokens and
    their last one where it is in `ends` (the tokenizer's special tokens: [SEP], </s>), else the first max_length.
    """
    rows = ds[list(indices)]
    if max_length is not None:
        cuts = [_cut(len(r), max_length, r[-1] in ends if r else False) for r in rows["input_ids"]]
        rows = {key: [[r[j] for j in keep] for r, keep in zip(values, cuts, strict=True)]
                if key in ("input_ids", "token_type_ids") else values for key, values in rows.items()}
    ids = rows["input_ids"]
    width = max(len(r) for r in ids)
    batch = {"attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])}
    for key, values in rows.items():
        if key == "input_ids" or key == "token_type_ids":
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([r + [fill] * (width - len(r)) for r in values])
    return batch


def _cut(length: int, max_length: int, keep_end: bool) -> range | list[int]:
    """The positions a row of `length` tokens keeps when cut to `max_length`."""
    if length <= max_length:
        return range(length)
    return [*range(max_length - 1), length - 1] if keep_end else range(max_length)


class StreamSampler:
    """This rank's micro-batches, step by step, of the global stream described in the module docstring."""

    max_length: int | None = None  # tokens per example for the current step (a curriculum phase's); None: all

    def __init__(self, num_samples: int, *, seed: int, micro_batch: int, grad_accum: int, world_size: int,
                 rank: int, samples: int = 0) -> None:
        if num_samples == 0:
            raise SpecError("data: the train split is empty")
        self.n, self.seed, self.micro, self.accum = num_samples, seed, micro_batch, grad_accum
        self.world, self.rank = world_size, rank
        self.samples = samples
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def next_step(self) -> list[list[tuple[int, int]]]:
        """grad_accum micro-batches of (dataset index, epoch); advances the position by one global batch."""
        micro = []
        for k in range(self.accum):
            start = self.samples + k * self.micro * self.world + self.rank * self.micro
            micro.append([self._at(start + j) for j in range(self.micro)])
        self.samples += self.global_batch
        return micro

    def _at(self, i: int) -> tuple[int, int]:
        epoch, j = divmod(i, self.n)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(seed_of(self.seed, "epoch", epoch))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return int(self._perms[epoch][j]), epoch


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from any tuple: distinct tuples give unrelated streams (unlike seed + epoch)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def eval_shards(num_samples: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's eval batches, strided over the split; -1 marks padding rows.

    Every rank gets the same number of equally sized batches, because ZeRO-3
    gathers parameters collectively in each forward pass.
    """
    per_rank = -(-num_samples // world_size)
    mine = list(range(rank, num_samples, world_size))
    mine += [-1] * (per_rank - len(mine))
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]
