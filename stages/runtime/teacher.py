"""A frozen teacher for knowledge distillation, and a preference stage's (dpo's) frozen reference model.

The teacher stays outside the student's DeepSpeed engine: it is a plain object here, never a submodule of the
trained net, so DeepSpeed neither partitions it with the student nor gives its parameters to the optimizer. It is
loaded from its input on every start (a resume included: the same weights, so the same logits), frozen
(`requires_grad_(False)`), in eval mode, and run under `torch.no_grad()`. Where it lives (`teacher_placement`):

- replicate: a full copy on every rank's device;
- zero3: partitioned across the ranks by a DeepSpeed engine with ZeRO stage 3 and no optimizer (forward only), built
  partitioned from the start (transformers' ZeRO-3 loading), so a teacher larger than one device fits. Each forward
  gathers its layers collectively: every rank must run the teacher equally often (the stage's eval shards are equal);
- cpu: kept on the CPU (its inputs go there, its logits come back to the student's device); on a machine without
  accelerator this is replicate.

Offline, a distill stage runs no teacher: `load_stored` reads the top-k logits a teacher_logits stage stored for every
training row (`Stored`), after checking that they are of this stage's rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from contract.heads import HEADS
from contract.kinds.teacher_logits import LOGITS_FILE, META_FILE
from stages.runtime import dist, models
from stages.runtime.spec import Spec, SpecError, TrainingSpec

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
Placement = Literal["replicate", "zero3", "cpu"]
Task = str  # a head's name (contract/heads)


class _Zero3Config:
    """What transformers asks of `HfDeepSpeedConfig` while it builds the teacher partitioned."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return True


class Teacher:
    """The frozen teacher: `logits(**inputs)` → its float32 logits on the student's device."""

    def __init__(self, model: Any, run: Any, placement: Placement, *, where: torch.device,
                 out: torch.device) -> None:
        self.model: Any = model  # a transformers PreTrainedModel
        self.placement = placement
        self._run = run  # the module itself, or its ZeRO-3 engine
        self._device, self._out = where, out  # where the teacher computes; the student's device

    def logits(self, **inputs: Any) -> torch.Tensor:
        """Its logits for a batch of model inputs (tensors go to the teacher's device, flags as they are)."""
        with torch.no_grad():
            out = self._run(**{k: v.to(self._device) if torch.is_tensor(v) else v for k, v in inputs.items()})
        return out.logits.float().to(self._out)

    def has(self, split: str) -> bool:
        return True  # it reads any batch

    def check_labels(self, names: list[str | int] | None) -> None:
        """Exit 2 unless the classifier teacher's labels (config.id2label) are the student's, in the same order
        (`names`; None: classes without names, a vocabulary)."""
        if names is None:
            return
        config = self.model.config
        _same_labels([str(config.id2label.get(i, i)) for i in range(config.num_labels)], names,
                     "inputs.teacher: its labels")

    def check_logits(self, student: nn.Module, task: Task) -> None:
        """Exit 2 when the student's logits would not line up with the teacher's (vocab_size, num_labels)."""
        _same_classes(student, task, getattr(self.model.config, HEADS[task].classes), "the teacher's")

    def describe(self) -> str:
        return f"teacher {self.placement}: {models.parameter_count(self.model):,} parameters"


def load(spec: Spec, device: torch.device, auto_class, placement: Placement, task: Task,
         name: str = "teacher") -> Teacher:
    """Collective with zero3. The frozen model of input `name` (distill's teacher; dpo's reference, its init), on
    `device` (the student's) or as placed, with its trained head: exit 2 when the checkpoint lacks weights of the
    model (a random head would teach noise)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ref = spec.ref(name)
    if ref.path is None:
        raise SpecError(f"inputs.{name}.path: missing (source {ref.source}); the {name} model must be trained")
    models.verify_digest(f"inputs.{name}", ref.path, ref.digest)
    holder = None
    if placement == "zero3":
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        holder = _Zero3Config(ds_config(spec))
        set_hf_deepspeed_config(holder)  # transformers builds and loads it partitioned
    try:
        model, info = auto_class.from_pretrained(ref.path, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise SpecError(f"inputs.{name}.path: {ref.path}: cannot load a {HEADS[task].model}: {e}") from None
    finally:
        if holder is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # the student is built by its own rules
    params = dict(model.named_parameters())
    missing = sorted(k for k in info.get("missing_keys", ()) if k in params)
    if missing:
        shown = ", ".join(missing[:6]) + (f" … and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise SpecError(f"inputs.{name}.path: {ref.path} lacks {len(missing)} weights of {type(model).__name__} "
                        f"({shown}): they would be random in the frozen model. Head {task} needs one trained as "
                        f"a {HEADS[task].model}")
    model.requires_grad_(False)
    model.eval()
    if placement == "zero3":
        import deepspeed

        run, *_ = deepspeed.initialize(model=model, config=ds_config(spec), dist_init_required=False)
        run.eval()
        here = sum(int(p.ds_tensor.numel()) for p in model.parameters() if hasattr(p, "ds_tensor"))
        dist.print0(f"{spec.stage}: {name} partitioned by ZeRO-3: {here:,} of its "
                    f"{models.parameter_count(model):,} values on rank 0")
        return Teacher(model, run, placement, where=device, out=device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.precision]
    where = torch.device("cpu") if placement == "cpu" else device
    model.to(device=where, dtype=dtype)
    return Teacher(model, model, placement, where=where, out=device)


def ds_config(spec: Spec) -> dict[str, Any]:
    """The teacher's DeepSpeed config under zero3: ZeRO stage 3, no optimizer, the student's batch shape (DeepSpeed
    checks it) and precision. Persistence threshold 0: every parameter partitioned, however small."""
    # zero3 is a placement of distill's teacher, which teacher_logits (no engine) never asks for
    assert isinstance(spec, TrainingSpec), f"kind {spec.kind}: a teacher placed by ZeRO-3 needs a training stage"
    student = spec.deepspeed
    keep = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")
    return {k: student[k] for k in keep if k in student} | {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def check_tokenizer(spec: Spec, tokenizer, task: Task, name: str = "teacher") -> None:
    """Exit 2 unless the teacher reads the student's tokens: logit distillation over a vocabulary (mlm, clm) needs one
    vocabulary, and a classifier teacher must see the same token ids as the student. Compares the teacher folder's
    tokenizer with the student's (tokens, ids, special tokens); a folder without one is compared by its config's
    vocab_size (mlm, clm: equal to the student tokenizer's size; classify: at least it). Before any data work.
    `name`: the input holding the teacher's folder (teacher_logits: the stored logits, saved with its tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    ref, mine = spec.ref(name), spec.ref("tokenizer")
    if ref.path is None:
        return  # load() says why
    vocabulary = HEADS[task].classes == "vocab_size"  # its logits range over the tokens
    why = "logits over one vocabulary" if vocabulary else "the same token ids for teacher and student"
    own = None
    # transformers 5 makes an empty tokenizer of the model type from a folder that has none: look for its files
    saved = not Path(ref.path).is_dir() or any(Path(ref.path, f).is_file() for f in TOKENIZER_FILES)
    try:
        own = AutoTokenizer.from_pretrained(ref.path) if saved else None
    except (OSError, ValueError, TypeError):
        pass
    if own is not None:
        differs = models.vocabulary_difference(own, tokenizer)
        if differs:
            raise SpecError(f"inputs.{name}: {ref.path} was trained with another tokenizer than the student's "
                            f"(inputs.tokenizer {mine.path}): {differs}. Distillation needs {why}: give the student "
                            "the teacher's tokenizer (tokenizer.from: the teacher's stage)")
        return
    try:
        size = int(AutoConfig.from_pretrained(ref.path).vocab_size)
    except (OSError, ValueError, TypeError, AttributeError):
        return  # load() reports a folder that holds no model
    fits = size == len(tokenizer) if vocabulary else size >= len(tokenizer)
    if not fits:
        raise SpecError(f"inputs.{name}: {ref.path} has no tokenizer and a vocabulary of {size} tokens, the "
                        f"student's tokenizer (inputs.tokenizer {mine.path}) {len(tokenizer)}. Distillation needs "
                        f"{why}")


def _same_labels(theirs: list[str], names: list[str | int], what: str) -> None:
    ours = [str(n) for n in names]
    if theirs != ours:
        raise SpecError(f"{what} {theirs} (config.id2label) are not the student's {ours} "
                        "(data.labels, or the sorted labels of the train split): distillation matches logits class "
                        "by class; give data.labels in the teacher's order")


def _same_classes(student: nn.Module, task: Task, theirs: int, whose: str) -> None:
    key = HEADS[task].classes
    ours = getattr(student.config, key)
    if theirs != ours:
        raise SpecError(f"inputs.init: the student's {key} {ours} is not {whose} {theirs}: distillation compares "
                        "their logits class by class")


class Stored:
    """A teacher_logits stage's output: per split ("train", "eval" where usable), the top-k (values, indices) of
    every row, rows in example order; `per_example` rows each (classify 1, clm block_size − 1 predicted tokens)."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], per_example: int,
                 device: torch.device) -> None:
        self.meta, self.per_example, self._device = meta, per_example, device
        self._splits = {split: (tensors[f"{split}.values"], tensors[f"{split}.indices"])
                        for split in ("train", "eval") if f"{split}.values" in tensors}

    def has(self, split: str) -> bool:
        return split in self._splits

    def rows(self, split: str, examples: list[int], tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the rows of `examples`, on the student's device, in the order distill's `rows` has
        the student's logits. clm: `tokens` is the batch's block length (a curriculum phase's max_length cuts it):
        the first tokens − 1 predictions of each block, which under causal attention see what the full block saw."""
        per = self.per_example
        take = per if tokens is None else min(per, tokens - 1)
        at = (torch.tensor(examples)[:, None] * per + torch.arange(take)).flatten()
        values, indices = self._splits[split]
        return values[at].to(self._device), indices[at].to(self._device)

    def check_labels(self, names: list[str | int] | None) -> None:
        """Exit 2 unless the stored classes are the student's labels, in the same order (None: a vocabulary)."""
        if names is None:
            return
        _same_labels([str(n) for n in self.meta["labels"]], names, "inputs.teacher_logits: the teacher's labels")

    def check_logits(self, student: nn.Module, task: Task) -> None:
        """Exit 2 when the student's logits would not line up with the stored classes (num_labels, vocab_size)."""
        _same_classes(student, task, self.meta["classes"], "the stored teacher logits' (inputs.teacher_logits)")

    def describe(self) -> str:
        return f"stored logits of stage {self.meta['stage']}, top {self.meta['top_k']} of {self.meta['classes']}"


def load_stored(spec: Spec, task: Task, *, block_size: int | None, examples: dict[str, int | None],
                device: torch.device) -> Stored:
    """The logits of input `teacher_logits`, checked against this stage: exit 2 (naming the file) unless they are of
    its task, training files (digests), block_size (clm) or data.max_length (classify), and its number of training
    examples. Eval rows are used only where they are of this stage's eval files, else left out (with a note)."""
    from safetensors.torch import load_file

    ref = spec.ref("teacher_logits")
    if ref.path is None:
        raise SpecError("inputs.teacher_logits.path: missing (the output of a teacher_logits stage)")
    models.verify_digest("inputs.teacher_logits", ref.path, ref.digest)
    meta_path, logits_path = Path(ref.path, META_FILE), Path(ref.path, LOGITS_FILE)
    where = f"inputs.teacher_logits: stage {ref.stage}"
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(logits_path))
        stored_task, made = meta["task"], meta["examples"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{where}: {meta_path} or {logits_path} is missing or unreadable ({e})") from None
    if stored_task != task:
        raise SpecError(f"{where}: {meta_path} holds logits of task {stored_task}, this stage's distill.task is {task}")
    # what cut the examples into rows: packing's block_size, else data.max_length
    setting = ("block_size", block_size) if "block_size" in meta else ("max_length", spec.data.max_length)
    if meta.get(setting[0]) != setting[1]:
        raise SpecError(f"{where}: {meta_path}: its rows were made with {setting[0]} {meta.get(setting[0])}, this "
                        f"stage's is {setting[1]}")
    hub = spec.data.hub.model_dump() if spec.data.hub else None
    digests = [spec.data.digests[f] for f in spec.data.train_files]
    if meta.get("train_digests") != digests or _train_hub(meta.get("hub")) != _train_hub(hub) \
            or made.get("train") != examples["train"]:
        raise SpecError(f"{where}: {meta_path} holds the logits of {made.get('train')} examples of other training "
                        f"data than this stage's {examples['train']}; store them for this stage's data.train")
    per_example = (meta.get("rows") or {}).get("train", 0) // max(made.get("train") or 0, 1)
    for split in ("train", "eval"):
        shapes = [tuple(tensors[f"{split}.{part}"].shape) for part in ("values", "indices")
                  if f"{split}.{part}" in tensors]
        if split in made and shapes != [(made[split] * per_example, meta["top_k"])] * 2:
            raise SpecError(f"{where}: {logits_path} holds {shapes} for {split}, {meta_path} says "
                            f"{made[split]} examples of {per_example} rows, top_k {meta['top_k']}")
    eval_digests = [spec.data.digests[f] for f in spec.data.eval_files]
    if "eval" in made and (meta.get("eval_digests") != eval_digests or meta.get("hub") != hub
                             or made["eval"] != examples["eval"]):
        dist.print0(f"{spec.stage}: the stored teacher logits are of other eval data than this stage's: "
                    "teacher_agreement is left out")
        tensors = {k: v for k, v in tensors.items() if not k.startswith("eval.")}
    return Stored(meta, tensors, per_example, device)


def _train_hub(hub: dict[str, Any] | None) -> dict[str, Any] | None:
    """What of a hub data section decides the training rows (not its eval split)."""
    return None if hub is None else {k: v for k, v in hub.items() if k != "eval_split"}
