"""Masked-LM step time: baton's loss at the masked positions only vs the model's own `labels` path
(every position projected onto the vocabulary), measured in the same run on the quickstart's model.

    python bench/mlm_sparse_loss.py [--steps 30] [--vocab 8000] [--hidden 128] [--batch 32] [--length 48]

Prints seconds per forward+backward for each and their ratio (full / sparse), and checks that
both give the same loss.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from stages.runtime.heads.mlm import Rows


def step_time(fn, steps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=48)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=4 * args.hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(cfg)
    ids = torch.randint(5, args.vocab, (args.batch, args.length))
    mask = torch.ones_like(ids)
    labels = torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, -100))
    sparse = Rows(model)
    assert sparse.head is not None, "BERT's MLM head should be one module"

    def full_step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss

    def sparse_step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        rows = sparse(input_ids=ids, attention_mask=mask, labels=labels)
        loss = F.cross_entropy(rows.float(), labels[labels != -100])
        loss.backward()
        return loss

    a, b = full_step().item(), sparse_step().item()
    assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (a, b)
    full, fast = step_time(full_step, args.steps), step_time(sparse_step, args.steps)
    print(f"threads {torch.get_num_threads()}  vocab {args.vocab}  hidden {args.hidden}  "
          f"batch {args.batch}x{args.length}")
    print(f"full vocabulary projection  {full * 1000:7.1f} ms/step")
    print(f"masked positions only       {fast * 1000:7.1f} ms/step")
    print(f"ratio full / sparse         {full / fast:7.2f}x   (same loss: {a:.5f} vs {b:.5f})")


if __name__ == "__main__":
    main()
