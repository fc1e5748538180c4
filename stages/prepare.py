"""Tokenize a corpus once into sharded, memory-mapped token files with an index, for later stages to read by position.

    python -m torch.distributed.run --nproc_per_node N -m stages.prepare --spec spec.json

Each split of the data section (train, eval) is cut into shards of prepare.shard_rows rows; shard j of all the
splits' shards is rank j mod N's. A document is what clm packs (stages/runtime/packing.py `documents`): a non-blank
row's token ids without special tokens, then the end-of-document token. A rank writes each finished shard into
<stage>/shards/ atomically (stages/runtime/prepared.py) and skips the shards already there, so a killed preparation
continues from its finished shards, at any world size, and gives the same bytes as one never stopped.

final/ (rank 0 links the shards into final.tmp/, then renames it), as a reader sees it:

    train-00000.tokens.npy  train-00000.index.npy  …  eval-00000.tokens.npy …   (contract.kinds.prepare)
    prepared.json   format, tokenizer (vocabulary digest, size, end-of-document id), dtype, the sources' digests,
                    per split: rows, documents, tokens, its shards in order
    tokenizer files the tokenizer the ids are of

then result.json (metrics: the train split's documents and tokens). A stop request is honoured between two rounds of
shards: a `stop` record, the finished shards kept, exit 75.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from contract.files import write_json
from contract.kinds.prepare import FORMAT, PREPARED_FILE, PrepareOptions
from contract.layout import EXIT_DONE, EXIT_STOPPED
from contract.spec import vocabulary
from stages.runtime import data, dist, entry, export, models, packing, prepared, records, signals
from stages.runtime.dist import Dist
from stages.runtime.spec import Spec

TOKENIZE_BATCH = 10_000  # rows per tokenizer call: bounds the Python lists held at once, not the result


def main(spec: Spec, d: Dist) -> int:
    opts = spec.options_as(PrepareOptions)
    records.start(d.world_size)
    tokenizer = models.load_tokenizer(spec)
    eos = packing.end_of_document(tokenizer)
    dtype = prepared.dtype_for(len(tokenizer))
    raw = {split: ds for split, ds in data.load_raw(spec).items() if ds is not None}
    for split, ds in raw.items():
        data.check_text(ds, spec.data, split)
    work = Path(spec.stage_dir, "shards")
    work.mkdir(parents=True, exist_ok=True)
    field = spec.data.text_field
    shards = [(split, i, start, min(start + opts.shard_rows, len(ds)))
              for split, ds in raw.items() for i, start in enumerate(range(0, len(ds), opts.shard_rows))]

    t0, written = time.perf_counter(), 0
    for first in range(0, len(shards), d.world_size):  # a round: one shard per rank, then a collective stop check
        if first + d.rank < len(shards):
            split, i, start, end = shards[first + d.rank]
            if not prepared.shard_done(work, split, i):
                docs = [doc for at in range(start, end, TOKENIZE_BATCH)
                        for doc in packing.documents(tokenizer, raw[split][at : min(at + TOKENIZE_BATCH, end)][field],
                                                     eos)]
                prepared.write_shard(work, split, i, docs, dtype)
                written += end - start
        if dist.any_rank(signals.received()):
            records.log("stop", step=0, reason="signal")
            dist.print0(f"{spec.stage}: stopped on a signal; the finished shards are kept, exit 75 (running it "
                        "again continues from them)")
            return EXIT_STOPPED
    seconds = time.perf_counter() - t0
    print(f"{spec.stage}: rank {d.rank} tokenized {written} rows in {seconds:.1f} s", flush=True)

    meta = describe(spec, opts, tokenizer, eos, dtype.name, raw, shards, work)
    counts = meta["splits"]["train"]
    dist.print0(f"{spec.stage}: " + "; ".join(f"{split} {s['documents']} documents, {s['tokens']} tokens in "
                                              f"{len(s['shards'])} shards" for split, s in meta["splits"].items()))

    def fill(out: Path) -> None:
        for s in meta["splits"].values():  # links, not copies: the shards are as large as the corpus
            for shard in s["shards"]:
                for name in (shard["tokens"], shard["index"]):
                    os.link(work / name, out / name)
        write_json(out / PREPARED_FILE, meta)
        export.save_tokenizer(tokenizer, out)

    path, digest = export.write_folder(spec, fill)
    export.write_result(spec, steps=0, samples=0, output=path, digest=digest,
                        metrics={"documents": counts["documents"], "tokens": counts["tokens"]})
    if dist.is_main():
        shutil.rmtree(work, ignore_errors=True)  # final/ holds the same files
    return EXIT_DONE


def describe(spec: Spec, opts: PrepareOptions, tokenizer: Any, eos: int, dtype: str, raw: dict[str, Any],
             shards: list[tuple[str, int, int, int]], work: Path) -> dict[str, Any]:
    """prepared.json: what a reader needs and what decides the bytes, never where they lay (no absolute path: the
    same corpus prepared in another run folder has the same digest)."""
    import numpy as np

    splits: dict[str, Any] = {split: {"rows": len(ds), "documents": 0, "tokens": 0, "shards": []}
                              for split, ds in raw.items()}
    for split, i, _, _ in shards:
        tokens_name, index_name = prepared.shard_names(split, i)
        index = np.load(work / index_name, mmap_mode="r")
        s = splits[split]
        s["documents"] += len(index) - 1
        s["tokens"] += int(index[-1])
        s["shards"].append({"tokens": tokens_name, "index": index_name, "documents": len(index) - 1,
                            "token_count": int(index[-1])})
    return {"format": FORMAT, "dtype": dtype, "shard_rows": opts.shard_rows,
            "tokenizer": {"vocabulary": vocabulary(tokenizer), "size": len(tokenizer), "end_of_document": eos},
            "text_field": spec.data.text_field,
            "sources": {"train_digests": [spec.data.digests[f] for f in spec.data.train_files],
                        "eval_digests": [spec.data.digests[f] for f in spec.data.eval_files],
                        "hub": spec.data.hub.model_dump() if spec.data.hub else None},
            "splits": splits}


if __name__ == "__main__":
    entry.run(main)
