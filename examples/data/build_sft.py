"""Derive an instruction-tuning task for examples/sft.yaml from the supersense files.

    python examples/data/build_sft.py        # writes examples/data/wordnet/sft_{train,eval}.jsonl

Each labelled noun definition becomes a prompt, a question about what the definition names, and its completion
the supersense word (animal, artifact, body, food, location, person, plant, substance): a model that learnt the
glosses has to answer with one word. Train rows come from supersense_train.jsonl and eval rows from
supersense_eval.jsonl only; neither's synsets are in the pretraining glosses (build_wordnet.py leaves them out).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "wordnet"


def prompt(definition: str) -> str:
    return f"What kind of thing is {definition}?"


def main() -> None:
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (HERE / f"supersense_{split}.jsonl").read_text().splitlines()]
        out = [{"prompt": prompt(r["text"]), "completion": r["label"]} for r in rows]
        (HERE / f"sft_{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))


if __name__ == "__main__":
    main()
