"""`sft`: instruction tuning of a causal LM. Each example (a prompt and its completion, or a conversation) is written
out by the chat template (contract.heads.sft: the tokenizer's own, the manifest's, or DEFAULT_TEMPLATE) in pieces,
prompt and answer, each tokenized without special tokens of the tokenizer's adding (the template writes BOS, EOS
and its turn markers itself) and concatenated: what generation is prompted with at eval is exactly what training
read before the answer. The labels are the answer pieces' tokens (every token with sft.train_on_prompt), -100
elsewhere; position j predicts token j + 1.

Rows are kept whole and cut to data.max_length (or a curriculum phase's max_length) at batch time. A batch is one
example per row, padded on the right, or with sft.packing several examples per row: position ids restart at each
example, no attention mask, and transformers' sdpa/eager masks then keep every example to itself
(masking_utils.find_packed_sequence_indices), for the model types in PACKS.

Preference pairs (a dpo stage's `sft:` section, PreferenceOptions): each row is written twice, with its chosen and
with its rejected answer (`rejected_input_ids`, `rejected_labels`), both trained on their last answer only; the two
must agree before it. `pairs` batches them, `answer_logps` sums each answer's log-probabilities. The eval below is
of the chosen answers.

Eval: eval_loss and perplexity over the answer tokens; greedy generation of every eval prompt's last answer (up to
sft.max_new_tokens, stopping at the end token), exact_match against the reference with whitespace normalised; with
sft.label_set, accuracy: the label whose answer tokens have the highest log-likelihood after the prompt. A shared eval
set (a text set) is read as clm reads one: this head's model is a causal LM.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contract.heads import HEADS
from contract.heads.sft import (
    DEFAULT_TEMPLATE,
    SAMPLE_PAIR,
    Messages,
    PreferenceOptions,
    SftOptions,
    as_messages,
    segments,
)
from stages.runtime import data, dist, packing
from stages.runtime.dist import Dist
from stages.runtime.heads import Keys, Source, clm
from stages.runtime.masking import EVAL_EPOCH
from stages.runtime.metrics import language_model_metrics
from stages.runtime.spec import SpecError

# Model types whose attention keeps packed examples apart given position ids alone (they pass position_ids to
# transformers' create_causal_mask); tests/stages/test_sft.py checks each against unpacked rows
PACKS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
PACKED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")  # the implementations that read them


def normalise(text: str) -> str:
    return " ".join(text.split())


class Rows(nn.Module):
    """The causal LM's rows of logits that count (the predicted answer tokens), without a key/value cache."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, example: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).logits
        return clm.select(logits, {"labels": labels})


def pack_rows(ids: list[list[int]], labels: list[list[int]], capacity: int, pad: int) -> dict[str, torch.Tensor]:
    """The examples packed into rows of at most `capacity` tokens, first fit by decreasing length (ties by order):
    input_ids, labels, position_ids (from 0 in each example, and in the padding after the last) and `example`, the
    example each token is of (-1: padding). No attention mask: the position ids say where examples begin."""
    rows: list[list[int]] = []
    room: list[int] = []
    for j in sorted(range(len(ids)), key=lambda j: (-len(ids[j]), j)):
        at = next((r for r, free in enumerate(room) if free >= len(ids[j])), None)
        if at is None:
            rows.append([])
            room.append(capacity)
            at = len(rows) - 1
        rows[at].append(j)
        room[at] -= len(ids[j])
    width = max(capacity - free for free in room)
    out = {key: torch.full((len(rows), width), fill, dtype=torch.long)
           for key, fill in (("input_ids", pad), ("labels", -100), ("position_ids", 0), ("example", -1))}
    for r, members in enumerate(rows):
        at = 0
        for j in members:
            n = len(ids[j])
            out["input_ids"][r, at : at + n] = torch.tensor(ids[j])
            out["labels"][r, at : at + n] = torch.tensor(labels[j])
            out["position_ids"][r, at : at + n] = torch.arange(n)
            out["example"][r, at : at + n] = j
            at += n
        out["position_ids"][r, at:] = torch.arange(width - at)
    return out


def pad_rows(ids: list[list[int]], labels: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """One example per row, padded on the right to the longest."""
    width = max(map(len, ids))
    fill = lambda rows, value: torch.tensor([r + [value] * (width - len(r)) for r in rows])  # noqa: E731
    return {"input_ids": fill(ids, pad), "attention_mask": fill([[1] * len(r) for r in ids], 0),
            "labels": fill(labels, -100)}


class Head:
    name = "sft"
    classes: list[str | int] | None = None  # the logits range over the vocabulary

    def __init__(self, source: Source, opts: SftOptions, template: str, splits: dict[str, Any], *,
                 stops: list[int], label_ids: list[list[int]] | None) -> None:
        self.source, self.opts, self.template, self.splits = source, opts, template, splits
        self.stops, self.label_ids = stops, label_ids
        self.max_length = source.data.max_length
        tokenizer = source.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        self.metrics = tuple(m for m in HEADS["sft"].metrics if m not in opts.unreported())

    def auto(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_args(self, from_config: bool) -> dict[str, Any]:
        # A model built from a config stops generating where the template ends an answer.
        return {"eos_token_id": self.stops[0]} if from_config else {}

    def describe(self) -> str:
        parts = []
        for split, ds in self.splits.items():
            if ds is None:
                continue
            cut = sum(1 for n in self.trained(split, range(len(ds)), None, each=True) if n == 0)
            parts.append(f"{split} {len(ds)} examples" + (f" ({cut} with no answer token within data.max_length "
                                                          f"{self.max_length})" if cut else ""))
        return ", ".join(parts) + (", packed" if self.opts.packing else "")

    def lengths(self, split: str) -> list[int]:
        """Tokens per example (before the cut to data.max_length)."""
        return [len(ids) for ids in self.splits[split]["input_ids"]]

    def trained(self, split: str, indices: Any, max_length: int | None, each: bool = False) -> Any:
        """The tokens trained on (predicted answer tokens) of examples `indices` cut as `batch` cuts them: their sum,
        or with `each` one count per example."""
        cut = min(self.max_length, max_length or self.max_length)
        rows = self.splits[split][list(indices)]["labels"]
        counts = [sum(1 for label in r[1:cut] if label != -100) for r in rows]
        return counts if each else sum(counts)

    def batch(self, split: str, keys: Keys, max_length: int | None = None) -> dict[str, torch.Tensor]:
        return self._collate(split, keys, max_length, ("",))

    def pairs(self, split: str, keys: Keys, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Preference pairs: the chosen answers' rows, then the rejected answers' rows (2 × len(keys) rows)."""
        return self._collate(split, keys, max_length, ("", "rejected_"))

    def _collate(self, split: str, keys: Keys, max_length: int | None, sides: tuple[str, ...]
                 ) -> dict[str, torch.Tensor]:
        rows, real = [max(i, 0) for i, _ in keys], [i >= 0 for i, _ in keys]  # a padding row (-1) reads row 0
        cut = min(self.max_length, max_length or self.max_length)
        got = self.splits[split][rows]
        ids = [r[:cut] for side in sides for r in got[f"{side}input_ids"]]
        labels = [r[:cut] if keep else [-100] * len(r[:cut]) for side in sides
                  for r, keep in zip(got[f"{side}labels"], real, strict=True)]
        batch = pack_rows(ids, labels, cut, self.pad) if self.opts.packing else pad_rows(ids, labels, self.pad)
        return dist.to_device(batch)

    def module(self, model: nn.Module) -> nn.Module:
        return Rows(model)

    def select(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return clm.select(logits, batch)

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return clm.targets(batch)

    def examples(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "example" in batch:
            return batch["example"][:, 1:][clm.predicted(batch)]
        return clm.examples(batch)

    def loss(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(rows.float(), self.targets(batch))

    def sums(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[sum of the answer tokens' losses, answer tokens] in float64."""
        loss = F.cross_entropy(rows.float(), self.targets(batch), reduction="sum")
        return torch.tensor([float(loss), float(len(rows))], dtype=torch.float64)

    def metrics_of(self, total: torch.Tensor) -> dict[str, float]:
        """Collective. eval_loss (per answer token) and perplexity; the answers' metrics come from `evaluate`."""
        return language_model_metrics(total)

    def evaluate(self, net: Any, split: str, batch_size: int, d: Dist, predictions: str | None = None
                 ) -> dict[str, float]:
        ds = self.splits.get(split)
        if ds is None:
            return {}
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for indices in data.eval_shards(len(ds), batch_size, d.world_size, d.rank):
                batch = self.batch(split, [(i, EVAL_EPOCH) for i in indices])
                total += self.sums(net(**batch), batch)
        out = self.metrics_of(total)
        if self.opts.max_new_tokens or self.label_ids:
            out |= self._answers(net, split, batch_size, d, predictions)
        return out

    def example_losses(self, net: Any, indices: list[int]) -> torch.Tensor:
        """Each example's mean loss over its answer tokens (0 where it has none)."""
        batch = self.batch("train", [(i, EVAL_EPOCH) for i in indices])
        logps, tokens = self.answer_logps(net(**batch), batch, len(indices))
        return -logps / tokens.clamp(min=1)

    def answer_logps(self, rows: torch.Tensor, batch: dict[str, torch.Tensor], examples: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each of the batch's `examples` (its rows, or packed examples, in order): the sum of its answer tokens'
        log-probabilities under `rows` (a `module`'s output, or `select` of a model's logits) in float32, and how
        many answer tokens it has."""
        tokens = -F.cross_entropy(rows.float(), self.targets(batch), reduction="none")
        which = self.examples(batch)
        sums = torch.zeros(examples, dtype=tokens.dtype, device=tokens.device).index_add_(0, which, tokens)
        return sums, torch.bincount(which, minlength=examples)

    # ------------------------------------------------------------- answers: generation and labels

    def _answers(self, net: Any, split: str, batch_size: int, d: Dist, predictions: str | None) -> dict[str, float]:
        """Collective. exact_match of greedy generations and (with labels) accuracy; every rank runs as many
        generate() calls (synced_gpus: each forward pass with the others, as ZeRO-3 gathers parameters) and label
        passes, its padding rows included."""
        ds = self.splits[split]
        model = _causal_lm(net)
        limit = _positions(model.config)
        records: list[dict[str, Any]] = []
        with torch.no_grad():
            for indices in data.eval_shards(len(ds), batch_size, d.world_size, d.rank):
                rows = ds[[max(i, 0) for i in indices]]
                prompts = [ids[:n] for ids, n in zip(rows["input_ids"], rows["prompt_length"], strict=True)]
                texts = self._generate(model, prompts, limit) if self.opts.max_new_tokens else None
                chosen = self._choose(model, prompts, limit) if self.label_ids else None
                for j, i in enumerate(indices):
                    if i < 0:
                        continue
                    prompt = self.source.tokenizer.decode(prompts[j], skip_special_tokens=True)
                    record: dict[str, Any] = {"index": i, "prompt": prompt, "reference": rows["reference"][j]}
                    if texts is not None:
                        record |= {"prediction": texts[j],
                                   "exact_match": normalise(texts[j]) == normalise(rows["reference"][j])}
                    if chosen is not None:
                        assert self.opts.label_set is not None
                        record |= {"label": self.opts.label_set[chosen[j]], "correct": chosen[j] == rows["label"][j]}
                    records.append(record)
        counts = torch.tensor([len(records), sum(r.get("exact_match", False) for r in records),
                               sum(r.get("correct", False) for r in records)], dtype=torch.float64)
        dist.all_reduce_sum(counts)
        if predictions:
            gathered = dist.all_gather_objects(records)
            if dist.is_main():
                ordered = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
                with open(predictions, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
        out = {}
        if self.opts.max_new_tokens:
            out["exact_match"] = float(counts[1] / counts[0])
        if self.label_ids:
            out["accuracy"] = float(counts[2] / counts[0])
        return out

    def _generate(self, model: Any, prompts: list[list[int]], limit: int | None) -> list[str]:
        """Greedy answers to `prompts` (token ids), decoded up to the first stop token. Prompts are padded on the
        left; one whose answer would pass the model's positions keeps its last tokens."""
        from transformers import GenerationConfig

        new = self.opts.max_new_tokens
        if limit is not None:
            prompts = [p[-(limit - new):] if len(p) + new > limit else p for p in prompts]
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        config = GenerationConfig(max_new_tokens=new, do_sample=False, num_beams=1, eos_token_id=self.stops,
                                  pad_token_id=self.pad)
        batch = dist.to_device({"input_ids": ids, "attention_mask": mask})
        out = model.generate(**batch, generation_config=config, synced_gpus=dist.world_size() > 1)
        texts = []
        for row in out[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in self.stops), len(row))
            texts.append(self.source.tokenizer.decode(row[:end], skip_special_tokens=True))
        return texts

    def _choose(self, model: Any, prompts: list[list[int]], limit: int | None) -> list[int]:
        """For each prompt, the label whose answer tokens have the highest log-likelihood after it (summed). The
        prompts run once (padded on the left) and every label's answer continues each from its key/value cache."""
        assert self.label_ids is not None
        answers, n = self.label_ids, len(self.label_ids)
        last = max(map(len, answers))
        if limit is not None:
            prompts = [p[-(limit - last):] if len(p) + last > limit else p for p in prompts]
        width = max(map(len, prompts))
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        first = dist.to_device({"input_ids": torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts]),
                                "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)})
        out = model(**first, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values  # transformers 5 renames it
        cache.batch_repeat_interleave(n)
        # each (prompt, label) row: the answer's tokens, padded on the right (after them, so they see no padding)
        rows = torch.tensor([a + [self.pad] * (last - len(a)) for _ in prompts for a in answers])
        real = torch.tensor([[1] * len(a) + [0] * (last - len(a)) for _ in prompts for a in answers])
        then = dist.to_device({"input_ids": rows, "attention_mask": torch.cat([mask.repeat_interleave(n, 0), real], 1),
                               "position_ids": mask.sum(-1, keepdim=True).repeat_interleave(n, 0) + torch.arange(last)})
        logits = torch.cat([out.logits[:, -1:].repeat_interleave(n, 0),  # what the prompt's end predicts
                            model(**then, **{_cache_argument(model): cache}, use_cache=True).logits[:, :-1]], 1).float()
        targets = rows.masked_fill(real == 0, -100).to(logits.device)
        logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(len(rows), last)
        return logp.sum(-1).view(len(prompts), n).argmax(-1).tolist()


def _causal_lm(net: Any) -> Any:
    """The transformers model inside `net`: a `Rows`, or an engine around one."""
    rows = net if isinstance(net, Rows) else getattr(net, "module", None)
    if not isinstance(rows, Rows):
        raise TypeError(f"sft generates with the model of its own module, not {type(net).__name__}")
    return rows.model


def _cache_argument(model: Any) -> str:
    """What the model's forward calls its key/value cache (transformers 5 renames past_key_values to cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _positions(config: Any) -> int | None:
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


# ----------------------------------------------------------------- reading the data


def chat_template(tokenizer: Any, opts: SftOptions) -> str:
    """The template examples are written with: the tokenizer's own, else sft.template, else DEFAULT_TEMPLATE."""
    own = tokenizer.chat_template
    if isinstance(own, dict):  # named templates: the default one
        own = own.get("default")
    if own and opts.template and own != opts.template:
        raise SpecError("sft.template: the tokenizer has a chat template of its own, which sft uses; leave "
                        "sft.template out (it is for tokenizers without one)")
    return own or opts.template or DEFAULT_TEMPLATE


def check_packing(config: Any) -> None:
    """Exit-2 error where sft.packing would let packed examples attend to one another: a model type that does not
    read packed position ids, or (once a model is built, which sets it) an attention implementation that does not."""
    if config.model_type not in PACKS:
        raise SpecError(f"sft.packing: model type {config.model_type!r} does not keep packed examples apart by "
                        f"their position ids in this transformers; packing works for {', '.join(PACKS)}. "
                        "Set packing: false")
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is not None and implementation not in PACKED_ATTENTION:
        raise SpecError(f"sft.packing: attention implementation {implementation!r} does not read packed position "
                        f"ids; packing needs {', '.join(PACKED_ATTENTION)}")


class Writer:
    """Examples as token ids, pieces by pieces (`contract.heads.sft.segments`), with their labels."""

    def __init__(self, tokenizer: Any, template: str, opts: SftOptions, key: str) -> None:
        self.tokenizer, self.template, self.opts, self.key = tokenizer, template, opts, key

    def render(self, messages: Messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def pieces(self, messages: Messages) -> list[tuple[list[int], bool]]:
        try:
            found = segments(self.render, messages)
        except ValueError as e:
            raise SpecError(f"{self.key}: the chat template cannot write the example {_short(messages)}: {e}") from None
        ids = self.tokenizer([text for text, _ in found], add_special_tokens=False, verbose=False)["input_ids"]
        return [(piece, trained) for piece, (_, trained) in zip(ids, found, strict=True)]

    def example(self, messages: Messages, last_only: bool = False) -> dict[str, Any]:
        """input_ids, labels (-100 where nothing is learnt; always at position 0, which nothing predicts),
        prompt_length (the tokens before the last answer) and reference (the last answer's text). `last_only`: only
        the last answer is learnt (a preference pair's: what comes before it is the prompt both answers share)."""
        pieces = self.pieces(messages)
        last = max(k for k, (_, trained) in enumerate(pieces) if trained)
        ids = [t for piece, _ in pieces for t in piece]
        labels = [t if (trained and (k == last or not last_only)) or self.opts.train_on_prompt else -100
                  for k, (piece, trained) in enumerate(pieces) for t in piece]
        answer = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        return {"input_ids": ids, "labels": [-100] + labels[1:], "reference": answer,
                "prompt_length": sum(len(piece) for piece, _ in pieces[:last])}

    def answer(self, text: str) -> list[int]:
        """The tokens an answer `text` is written as (its trained piece), for label scoring."""
        return [t for piece, trained in self.pieces(as_messages(SAMPLE_PAIR[0]["content"], text)) if trained
                for t in piece]


def _prompt_end(tokenizer: Any, example: dict[str, Any]) -> str:
    """The last words of an example's prompt, for messages."""
    return tokenizer.decode(example["input_ids"][: example["prompt_length"]][-12:])


def _short(messages: Messages) -> str:
    text = json.dumps(messages, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."


def conversation(row: dict[str, Any], opts: SftOptions, key: str, answer: str | None = None) -> Messages:
    """A row as messages, its types checked. `answer`: the column read instead of the completion (or, with
    messages_field, of the conversation): a preference pair's rejected one."""
    if opts.messages_field is None:
        column = answer or opts.completion_field
        prompt, completion = row[opts.prompt_field], row[column]
        for name, value in ((opts.prompt_field, prompt), (column, completion)):
            if not isinstance(value, str) or not value.strip():
                raise SpecError(f"{key}: a row's {name} is {json.dumps(value)[:80]}, not a text")
        return as_messages(prompt, completion)
    column = answer or opts.messages_field
    messages = row[column]
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise SpecError(f"{key}: a row's {column} is {json.dumps(messages)[:80]}, not a list of "
                        "{role, content} messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load(source: Source) -> Any:
    if source.eval_only:
        return clm.load(source)  # a shared text set: this head's model is scored as the causal LM it is
    if not source.labelled:  # validate says so first (contract.heads: sft reads no unlabelled rows)
        raise SpecError(f"{source.key}: task sft cannot read rows without labels: its rows are a completion's "
                        "tokens, which text alone does not have")
    # a preference stage's section names the rejected answers' column too
    opts = (PreferenceOptions if "rejected_field" in source.options else SftOptions).model_validate(source.options)
    rejected = opts.rejected_field if isinstance(opts, PreferenceOptions) else None
    tokenizer = source.tokenizer
    template = chat_template(tokenizer, opts)
    writer = Writer(tokenizer, template, opts, source.key)
    end = packing.end_of_document(tokenizer)
    # what generation stops at: the end token, and a special token the template closes an answer with (<|im_end|>)
    closing = [t for t in writer.answer("x") if t in tokenizer.all_special_ids and t != end]
    stops = [end, *closing[-1:]]
    label_ids = [writer.answer(label) for label in opts.label_set] if opts.label_set else None
    raw = data.load_section(source.data, source.cache_dir, train=source.train, key=source.key)
    columns = [opts.messages_field] if opts.messages_field else [opts.prompt_field, opts.completion_field]
    columns += [rejected] if rejected else []
    out_dir = Path(source.cache_dir, "tokenized")
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split, ds in raw.items():
        if ds is None:
            splits[split] = None
            continue
        for column in columns:
            if column not in ds.column_names:
                field = next(f for f in ("messages_field", "prompt_field", "completion_field", "rejected_field")
                             if getattr(opts, f, None) == column)
                raise SpecError(f"sft.{field}: column {column!r} not in the {split} split (columns: "
                                f"{', '.join(ds.column_names)})")

        def encode(batch: dict[str, list]) -> dict[str, list]:
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            made = [writer.example(conversation(row, opts, source.key), last_only=rejected is not None)
                    for row in rows]
            out = {name: [m[name] for m in made] for name in ("input_ids", "labels", "prompt_length", "reference")}
            if rejected is not None:
                other = [writer.example(conversation(row, opts, source.key, rejected), last_only=True) for row in rows]
                for chosen, worse in zip(made, other, strict=True):
                    n = chosen["prompt_length"]
                    if worse["prompt_length"] != n or worse["input_ids"][:n] != chosen["input_ids"][:n]:
                        raise SpecError(f"{source.key}: a preference pair whose answers follow different prompts "
                                        f"(the chosen one after {_prompt_end(tokenizer, chosen)!r}, the rejected "
                                        f"one after {_prompt_end(tokenizer, worse)!r}); both must answer the same "
                                        "conversation")
                out |= {"rejected_input_ids": [w["input_ids"] for w in other],
                        "rejected_labels": [w["labels"] for w in other]}
            return out

        key = data.cache_key("sft", source.tokenizer_digest, ds._fingerprint, template,
                             opts.model_dump(include={"prompt_field", "completion_field", "messages_field",
                                                      "train_on_prompt", "rejected_field"}))
        kept = list(source.difficulty)
        splits[split] = data.map_by_rank(ds, encode, key=key, path=out_dir / f"sft-{split}-{key}",
                                         remove_columns=[c for c in ds.column_names if c not in kept])
    if opts.label_set is not None and splits.get("eval") is not None:
        splits["eval"] = _with_labels(splits["eval"], opts.label_set)
    return Head(source, opts, template, splits, stops=stops, label_ids=label_ids)


def _with_labels(ds: Any, labels: list[str]) -> Any:
    """The eval split with each example's label id; every reference must be one of the labels."""
    ids = {normalise(label): i for i, label in enumerate(labels)}
    found = []
    for i, reference in enumerate(ds["reference"]):
        if normalise(reference) not in ids:
            raise SpecError(f"sft.label_set: eval example {i}: its completion {reference!r} is not one of the labels "
                            f"({', '.join(labels)})")
        found.append(ids[normalise(reference)])
    return ds.add_column("label", found, new_fingerprint=data.cache_key(ds._fingerprint, "labels", labels))
