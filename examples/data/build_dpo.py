"""Derive preference pairs for examples/dpo.yaml from the supersense files.

    python examples/data/build_dpo.py        # writes examples/data/wordnet/dpo_{train,eval}.jsonl

Each labelled noun definition becomes the prompt of examples/data/build_sft.py ("What kind of thing is
<definition>?") with two answers: the right supersense word (chosen) and one of the seven wrong ones (rejected),
drawn from the definition's text alone, so the pairs are the same on every machine. Train pairs come from
supersense_train.jsonl (the sft stage's training definitions), eval pairs from supersense_eval.jsonl.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from build_sft import prompt

HERE = Path(__file__).resolve().parent / "wordnet"
LABELS = ("animal", "artifact", "body", "food", "location", "person", "plant", "substance")


def preference(row: dict[str, str], index: int) -> dict[str, str]:
    """A supersense row as a preference pair: its label chosen over a wrong label drawn from its text and index."""
    wrong = random.Random(f"{index}:{row['text']}").choice([label for label in LABELS if label != row["label"]])
    return {"prompt": prompt(row["text"]), "chosen": row["label"], "rejected": wrong}


def main() -> None:
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (HERE / f"supersense_{split}.jsonl").read_text().splitlines()]
        out = [preference(r, i) for i, r in enumerate(rows)]
        (HERE / f"dpo_{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))


if __name__ == "__main__":
    main()
