"""The peer without a framework: a plain PyTorch DDP loop doing the work of baton's stage.

    torchrun --standalone --nproc_per_node 2 bench/peers/plain_loop.py --workload mlm --loss masked \
        --steps 300 --settings WORK/settings.json --out timings.jsonl

gloo on the CPU, nccl on GPUs (one per process), DistributedDataParallel, torch.optim.AdamW (decay on matrices
only, as baton), baton's schedule (linear warm-up, then linear / cosine decay), gradient clipping at max_grad_norm;
fp32, or with the workload's precision bf16 the forward pass under torch.autocast (fp32 weights and optimizer:
what a user writes by hand; DeepSpeed's bf16 keeps bf16 weights and fp32 master copies). Each rank draws its own
micro-batches from a per-epoch shuffle, padded to the batch's longest row. Losses:
  mlm --loss full     the model's own `labels` path (every position projected onto the vocabulary)
  mlm --loss masked   the MLM head applied at the masked positions only (as baton's mlm head)
  clm                 next-token loss on packed blocks (the model's `labels` path; no padding, no mask)
  classify            cross-entropy of the classification head
"""

from __future__ import annotations

import math
import os
import resource

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import Timings, arguments, build_model, dataset, load_tokenizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class MaskedLMLoss(nn.Module):
    """Mean cross-entropy at the masked positions, projecting only those onto the vocabulary."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        picked = labels != -100
        return F.cross_entropy(self.model.cls(hidden[picked]), labels[picked])


class ModelLoss(nn.Module):
    """The model's own loss from `labels` (mlm full, clm, classify)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch).loss


def schedule(w: dict, steps: int):
    def f(s: int) -> float:
        if s < w["warmup_steps"]:
            return (s + 1) / (w["warmup_steps"] + 1)
        progress = min(1.0, (s - w["warmup_steps"]) / max(1, steps - w["warmup_steps"]))
        return 1.0 - progress if w["schedule"] == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def main() -> None:
    args = arguments({"--loss": {"choices": ["full", "masked"], "default": "full", "help": "mlm only"}})
    w = args.w
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=w.get("precision") == "bf16")
    timings = Timings(args.out, rank, {"tool": "plain", "loss": args.loss, "world_size": world})

    tokenizer = load_tokenizer(args.tokenizer)
    data = dataset(w, tokenizer, args.cache_dir)
    extra = {"num_labels": data.num_labels} if w["kind"] == "classify" else {}
    model = build_model(w, tokenizer, args.seed, **extra).to(device)
    if w["kind"] == "clm":
        collate = lambda rows: {"input_ids": (ids := torch.tensor([r["input_ids"] for r in rows])),  # noqa: E731
                                "labels": ids, "use_cache": False}
    else:
        from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

        collate = (DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15) if w["kind"] == "mlm"
                   else DataCollatorWithPadding(tokenizer))
    net = DistributedDataParallel(MaskedLMLoss(model) if args.loss == "masked" and w["kind"] == "mlm"
                                  else ModelLoss(model), device_ids=[device.index] if cuda else None)
    decay = [p for p in net.parameters() if p.ndim >= 2]
    no_decay = [p for p in net.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": w["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=w["lr"], betas=tuple(w["betas"]), eps=w["eps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(w, args.steps))
    torch.manual_seed(args.seed + 1_000_003 * (rank + 1))  # dropout and masking: a stream per rank

    def batches():
        for epoch in range(1_000_000):
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
            mine = order[rank * w["micro_batch_size"] :]  # this rank's slice of each global micro-batch
            stride = world * w["micro_batch_size"]
            for start in range(0, len(mine) - w["micro_batch_size"] + 1, stride):
                batch = collate([data[i] for i in mine[start : start + w["micro_batch_size"]]])
                yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    net.train()
    stream, window = batches(), []
    for step in range(1, args.steps + 1):
        for k in range(w["grad_accum"]):
            batch = next(stream)
            if k < w["grad_accum"] - 1:
                with net.no_sync():
                    with autocast:
                        loss = net(**batch) / w["grad_accum"]
                    loss.backward()
            else:
                with autocast:
                    loss = net(**batch) / w["grad_accum"]
                loss.backward()
            window.append(loss.item() * w["grad_accum"])
        torch.nn.utils.clip_grad_norm_(net.parameters(), w["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logged = step % w["log_every"] == 0 or step == args.steps
        timings.step(step, sum(window) / len(window) if logged else None)
        if logged:
            window = []
    # as baton's train records: the GPU's allocated tensors, else the process's peak resident set (KiB on Linux)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peak /= 2**20
    timings.close(peak_memory_mb=peak)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
