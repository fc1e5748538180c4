"""Masked-LM masking, for the mlm head (stages/runtime/heads/mlm.py).

BERT-style masking (80 % [MASK], 10 % random token, 10 % unchanged) whose randomness derives from
(seed, sample index, epoch) alone, so a resumed run masks exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

from stages.runtime import data
from stages.runtime.spec import SpecError

EVAL_EPOCH = -1  # masking stream of the eval split, apart from every training epoch


class Masker:
    """BERT masking of collated batches; sample (index, epoch)'s masks are a pure function of (seed, index, epoch).

    Each position draws from a counter-based hash of (the sample's key, position, stream): no generator per
    sample, the whole batch at once, and the draws depend on the sample alone (not on its batch or the batch's
    padded width), so any world size, batch shape or resume masks a sample alike.
    """

    def __init__(self, tokenizer, mask_prob: float, seed: int) -> None:
        if tokenizer.mask_token_id is None:
            raise SpecError("tokenizer: has no mask token, which masked-LM training needs")
        self.mask_id, self.vocab = tokenizer.mask_token_id, len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.prob, self.seed = mask_prob, seed

    def __call__(self, batch: dict[str, torch.Tensor], keys: list[tuple[int, int]]) -> None:
        """Masks batch["input_ids"] in place and adds batch["labels"]; row i is sample keys[i] = (index, epoch)."""
        ids = batch["input_ids"]
        rows = torch.tensor([_key(data.seed_of(self.seed, "mask", index, epoch)) for index, epoch in keys])
        counter = torch.arange(ids.shape[1]) * 4  # position p, stream k: counter 4p + k
        pick, how, random_ids = (_hash(rows[:, None], counter + k) for k in (1, 2, 3))
        pick, how = _uniform(pick), _uniform(how)
        maskable = batch["attention_mask"].bool() & ~torch.isin(ids, self.special)
        chosen = (pick < self.prob) & maskable
        # Every sample contributes: one that drew no mask takes its maskable position with the lowest draw.
        none = ~chosen.any(1) & maskable.any(1)
        lowest = pick.masked_fill(~maskable, 2.0).argmin(1)
        chosen[none, lowest[none]] = True
        batch["labels"] = torch.where(chosen, ids, -100)
        ids.copy_(torch.where(chosen & (how < 0.8), self.mask_id,
                              torch.where(chosen & (how >= 0.9), random_ids % self.vocab, ids)))


_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """x · c mod 2^32 for 0 ≤ x < 2^32 (an int or an int64 tensor), without int64 overflow."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _lowbias32(x):
    """Wellons' lowbias32 integer hash of values < 2^32 (an int or an int64 tensor)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seed: int) -> int:
    """A 63-bit seed folded to 32 bits through the hash."""
    return _lowbias32(_lowbias32(seed & _M32) ^ ((seed >> 32) & _M32))


def _hash(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit values of (key, counter), broadcast."""
    return _lowbias32(key ^ _lowbias32(counter))


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """32-bit values to floats in [0, 1)."""
    return x.double() / 2.0**32
