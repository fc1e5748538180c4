"""The Hugging Face Trainer peer: transformers.Trainer + DeepSpeed doing the work of baton's stage.

    torchrun --standalone --nproc_per_node 2 bench/peers/hf_trainer.py --workload mlm \
        --steps 300 --settings WORK/settings.json --out timings.jsonl

The DeepSpeed config is the one baton's stage gets (ds_configs/zero2.json with its "auto" values filled from the
same train settings; the driver writes it into settings.json and checks it against baton's spec.json), with
`torch_adam` as baton sets it on CPU (DeepSpeed's own CPU Adam would JIT-compile C++ first). Losses are the
Trainer's standard ones: DataCollatorForLanguageModeling (mlm_probability 0.15; mlm=False on clm's packed
blocks) and the classification head's loss. The Trainer needs `accelerate` (bench/README.md).
"""

from __future__ import annotations

import os

import torch
from common import Timings, arguments, build_model, dataset, load_tokenizer
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class StepTimes(TrainerCallback):
    """Rank 0's wall-clock time after each optimizer step, and the Trainer's logged loss."""

    def __init__(self, timings: Timings) -> None:
        self.timings = timings

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.timings.records[-1]["loss"] = logs["loss"]  # the step just timed

    def on_step_end(self, args, state, control, **kwargs):
        self.timings.step(state.global_step)


def main() -> None:
    args = arguments()
    w = args.w
    deepspeed = w["deepspeed"] | {"optimizer": {**w["deepspeed"]["optimizer"], "params": {
        **w["deepspeed"]["optimizer"]["params"], **({} if torch.cuda.is_available() else {"torch_adam": True})}}}
    training = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(args.out) or ".", "hf-output"),
        deepspeed=deepspeed,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else "gloo",
        max_steps=args.steps,
        per_device_train_batch_size=w["micro_batch_size"],
        gradient_accumulation_steps=w["grad_accum"],
        learning_rate=w["lr"],
        lr_scheduler_type={"linear": "linear", "cosine": "cosine"}[w["schedule"]],
        warmup_steps=w["warmup_steps"],
        weight_decay=w["weight_decay"],
        max_grad_norm=w["max_grad_norm"],
        adam_beta1=w["betas"][0], adam_beta2=w["betas"][1], adam_epsilon=w["eps"],
        seed=args.seed,
        logging_steps=w["log_every"],
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        average_tokens_across_devices=False,
    )
    timings = Timings(args.out, training.process_index, {"tool": "trainer", "world_size": training.world_size})

    tokenizer = load_tokenizer(args.tokenizer)
    data = dataset(w, tokenizer, args.cache_dir)
    if w["kind"] == "classify":
        model = build_model(w, tokenizer, args.seed, num_labels=data.num_labels)
        collator = DataCollatorWithPadding(tokenizer)
    else:
        model = build_model(w, tokenizer, args.seed, **({"use_cache": False} if w["kind"] == "clm" else {}))
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=w["kind"] == "mlm", mlm_probability=0.15)
    trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=collator,
                      callbacks=[StepTimes(timings)])
    trainer.train()
    engine = trainer.model_wrapped  # the DeepSpeed engine when DeepSpeed trained, as the driver checks
    timings.records.append({"event": "end", "engine": type(engine).__name__,
                            "zero_stage": getattr(engine, "zero_optimization_stage", lambda: None)()})
    timings.close()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
