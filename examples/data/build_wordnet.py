"""Rebuild the quickstart data from WordNet 3.0 (Debian package `wordnet-base`).

    apt-get install wordnet-base
    python examples/data/build_wordnet.py            # writes examples/data/wordnet/

Outputs, all deterministic for a given WordNet:
  supersense_train.jsonl / supersense_eval.jsonl  noun definitions labelled by
      their lexicographer file (supersense), TRAIN_PER_CLASS / EVAL_PER_CLASS each
  pretrain.txt / pretrain_eval.txt  one gloss per line from all parts of speech,
      minus every synset used in the labelled files: PRETRAIN_LINES to train on and
      PRETRAIN_EVAL_LINES held out for the masked-LM evaluation
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# lexicographer file numbers (wndb(5), lexnames(5)) of the eight classes
CLASSES = {5: "animal", 6: "artifact", 8: "body", 13: "food", 15: "location", 18: "person", 20: "plant",
           27: "substance"}
TRAIN_PER_CLASS = 100
EVAL_PER_CLASS = 100
PRETRAIN_LINES = 40_000
PRETRAIN_EVAL_LINES = 1_000
SEED = 20261129


def read_synsets(path: Path):
    """Yield (offset, lexfile number, gloss) for every synset line of a wndb data file."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            yield fields[0], int(fields[1]), " ".join(gloss.split())


def definition(gloss: str) -> str:
    """The definition part of a gloss, without the quoted usage examples."""
    return gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=here / "wordnet")
    args = parser.parse_args()
    rng = random.Random(SEED)

    by_class: dict[str, list[tuple[str, str]]] = {name: [] for name in CLASSES.values()}
    for offset, lexfile, gloss in read_synsets(args.wordnet / "data.noun"):
        text = definition(gloss)
        if lexfile in CLASSES and len(text.split()) >= 3:
            by_class[CLASSES[lexfile]].append((f"n{offset}", text))

    train, evaluation, used = [], [], set()
    for label, items in sorted(by_class.items()):
        picked = rng.sample(items, TRAIN_PER_CLASS + EVAL_PER_CLASS)
        used.update(key for key, _ in picked)
        train += [{"text": t, "label": label} for _, t in picked[:TRAIN_PER_CLASS]]
        evaluation += [{"text": t, "label": label} for _, t in picked[TRAIN_PER_CLASS:]]
    rng.shuffle(train)
    rng.shuffle(evaluation)

    corpus = []
    for pos, letter in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        for offset, _, gloss in read_synsets(args.wordnet / f"data.{pos}"):
            if f"{letter}{offset}" not in used:
                corpus.append(gloss)
    corpus = rng.sample(corpus, PRETRAIN_LINES + PRETRAIN_EVAL_LINES)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("supersense_train.jsonl", train), ("supersense_eval.jsonl", evaluation)):
        with (args.out / name).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (args.out / "pretrain.txt").write_text("\n".join(corpus[:PRETRAIN_LINES]) + "\n", encoding="utf-8")
    (args.out / "pretrain_eval.txt").write_text("\n".join(corpus[PRETRAIN_LINES:]) + "\n", encoding="utf-8")
    print(f"{len(train)} train, {len(evaluation)} eval, {PRETRAIN_LINES}+{PRETRAIN_EVAL_LINES} pretraining lines "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
