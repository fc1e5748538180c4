"""Derive a second, coarser classification task for examples/multitask.yaml from the supersense files.

    python examples/data/build_coarse.py        # writes examples/data/wordnet/coarse_{train,eval}.jsonl

Each labelled definition keeps its text; its label becomes whether the noun names a living thing (animal, body,
person, plant) or not (artifact, food, location, substance). Train rows come from supersense_train.jsonl and eval
rows from supersense_eval.jsonl only, so the two tasks share no eval definition with any training row.
"""

from __future__ import annotations

import json
from pathlib import Path

LIVING = {"animal", "body", "person", "plant"}
HERE = Path(__file__).resolve().parent / "wordnet"


def main() -> None:
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (HERE / f"supersense_{split}.jsonl").read_text().splitlines()]
        out = [{"text": r["text"], "label": "living" if r["label"] in LIVING else "nonliving"} for r in rows]
        (HERE / f"coarse_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))


if __name__ == "__main__":
    main()
