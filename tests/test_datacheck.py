"""launcher/datacheck.py, on files made here: a column of conversations (sft's `messages`) counts as text; other
lists, numbers and nulls in a text column are refused before launch with the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher import datacheck

CHAT = [{"role": "user", "content": "a dog"}, {"role": "assistant", "content": "noun.animal"}]


def rows(tmp_path: Path, *values: object) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": v}) + "\n" for v in values))
    return path


def test_a_column_of_conversations_passes(tmp_path: Path) -> None:
    assert datacheck.check({"train": [str(rows(tmp_path, CHAT, CHAT))]}, "json", ["messages"]) == []


@pytest.mark.parametrize("bad", [[1, 2], [], [{"role": "user"}], 3, None])
def test_what_is_neither_text_nor_a_conversation_is_refused_with_its_line(tmp_path: Path, bad: object) -> None:
    path = rows(tmp_path, CHAT, bad)
    [(split, problem)] = datacheck.check({"train": [str(path)]}, "json", ["messages"])
    assert split == "train" and f"{path}: line 2: messages is" in problem and "conversation" in problem
