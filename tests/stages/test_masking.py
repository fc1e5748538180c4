"""The masked-LM masking: a pure function of (seed, sample, epoch), BERT's proportions, never special tokens."""

from __future__ import annotations

import torch

from stages.runtime.masking import Masker, _lowbias32

VOCAB, MASK, SPECIAL = 8000, 4, [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask


class _Tokenizer:
    mask_token_id = MASK
    all_special_ids = SPECIAL

    def __len__(self) -> int:
        return VOCAB


def _batch(lengths: list[int], width: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of [CLS] words… [SEP] of the given lengths, padded to `width` (default: the longest)."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(len(SPECIAL), VOCAB, (n,), generator=g)
        ids[r, 0], ids[r, n - 1] = 2, 3
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _masked(lengths, keys, width=None, seed=0, prob=0.15, mask_seed=1234):
    batch = _batch(lengths, width, seed)
    original = batch["input_ids"].clone()
    Masker(_Tokenizer(), prob, mask_seed)(batch, keys)
    return original, batch


def test_the_hash_is_lowbias32_on_ints_and_tensors():
    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2**16 - 1, 2**16, 2**31, 2**32 - 1, *torch.randint(0, 2**32, (2000,)).tolist()]
    assert _lowbias32(torch.tensor(xs)).tolist() == [reference(x) for x in xs] == [_lowbias32(x) for x in xs]


def test_a_sample_masks_alike_in_any_batch_width_and_position():
    _, alone = _masked([30], [(7, 2)], seed=5)
    _, padded = _masked([12, 30, 20], [(1, 0), (7, 2), (3, 0)], width=64, seed=5)
    # row 1 of the second batch holds other tokens (seed 5 draws differently per row), so compare the choices
    picked_alone = alone["labels"][0] != -100
    picked_padded = padded["labels"][1, :30] != -100
    assert torch.equal(picked_alone, picked_padded)
    assert (padded["labels"][1, 30:] == -100).all()


def test_the_epoch_and_the_seed_change_the_masks_and_a_repeat_does_not():
    keys = [(i, 0) for i in range(16)]
    first = _masked([40] * 16, keys)[1]["labels"]
    assert torch.equal(first, _masked([40] * 16, keys)[1]["labels"])
    assert not torch.equal(first, _masked([40] * 16, [(i, 1) for i in range(16)])[1]["labels"])
    assert not torch.equal(first, _masked([40] * 16, keys, mask_seed=99)[1]["labels"])


def test_bert_proportions_and_never_special_or_padding():
    lengths = [int(n) for n in torch.randint(3, 128, (400,))]
    original, batch = _masked(lengths, [(i, 0) for i in range(400)])
    chosen = batch["labels"] != -100
    maskable = batch["attention_mask"].bool() & (original >= len(SPECIAL))
    assert not (chosen & ~maskable).any()
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert (chosen.any(1) == maskable.any(1)).all()  # every sample with a maskable token contributes
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    now = batch["input_ids"][chosen]
    assert abs(float((now == MASK).float().mean()) - 0.8) < 0.02
    assert abs(float((now == original[chosen]).float().mean()) - 0.1) < 0.02  # kept (or drew itself)
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    assert now.max() < VOCAB


def test_a_short_sample_that_draws_no_mask_gets_one():
    lengths = [3] * 200  # [CLS] w [SEP]: one maskable token, drawn with p = 0.15
    original, batch = _masked(lengths, [(i, 0) for i in range(200)])
    assert ((batch["labels"] != -100).sum(1) == 1).all()
    assert (batch["labels"][:, 1] == original[:, 1]).all()
