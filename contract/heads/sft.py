"""`sft`: instruction tuning of a causal LM (the completion, or every assistant turn, is predicted; the prompt is
read). Its eval adds greedy generation: exact_match of every eval prompt's completion, and where the completions are
labels (sft.label_set) accuracy, the label the model finds likeliest.

Its settings (`SftOptions`: an sft stage's `sft:` section, a distill stage's `distill.head` with task sft) and the
chat template they name are checked here, before anything launches, by rendering sample conversations: a template
must write every message's content, and each assistant turn must begin where the prompt with its generation header
ends (`segments`), which is what lets the stage tell the trained tokens from the prompt's. The template is the
tokenizer's own; for a tokenizer without one (baton's SentencePiece tokenizer), `template` or else DEFAULT_TEMPLATE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator

from contract.heads import HeadInfo
from contract.sections import Data, Problem, Strict

# For a tokenizer without a chat template: "user: <prompt><end>assistant: <completion><end>", where <end> is the
# tokenizer's EOS, or its [SEP] where it has none (baton's tokenizer, whose documents clm ends with [SEP]); a BOS
# first where the tokenizer has one. Jinja, as transformers renders chat templates.
DEFAULT_TEMPLATE = (
    "{{ bos_token if bos_token is defined else '' }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token if eos_token is defined else sep_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

Messages = list[dict[str, str]]
Render = Callable[[Messages, bool], str]  # (messages, add_generation_prompt) -> the template's text

# What validation renders a template with: a question and answer, and a conversation of two exchanges
SAMPLE_PAIR: Messages = [{"role": "user", "content": "Name the colour of a clear daytime sky."},
                         {"role": "assistant", "content": "blue"}]
SAMPLE_CHAT: Messages = [{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": "What do bees make?"},
                         {"role": "assistant", "content": "honey"},
                         {"role": "user", "content": "And silkworms?"},
                         {"role": "assistant", "content": "silk"}]
# The special tokens validation renders with (the stage renders with the tokenizer's own)
PLACEHOLDERS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "[SEP]",
                "pad_token": "<pad>", "cls_token": "[CLS]", "mask_token": "[MASK]"}


def segments(render: Render, messages: Messages) -> list[tuple[str, bool]]:
    """The conversation's text in pieces, (text, trained): each assistant turn (its content and what the template
    ends it with) is a trained piece, everything else is prompt. ValueError where the template does not write the
    conversation so (a turn that does not continue the prompt before it, content left out)."""
    full = render(messages, False)
    out: list[tuple[str, bool]] = []
    at = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation begins with an assistant message: there is no prompt to answer")
        start = render(messages[:i], True)  # the prompt of turn i, with the header that opens the answer
        end = render(messages[: i + 1], False)
        if not (end.startswith(start) and full.startswith(end)) or len(start) < at:
            raise ValueError(f"message {i} (assistant): the template does not write it after the prompt before it "
                             "with the generation prompt (add_generation_prompt); the answer's tokens cannot be "
                             "told from the prompt's")
        if message["content"].strip() not in end[len(start):]:
            raise ValueError(f"message {i} (assistant): its content is not in what the template writes for it")
        out += [(full[at : len(start)], False), (full[len(start) : len(end)], True)]
        at = len(end)
    if not out:
        raise ValueError("no assistant message: nothing to train on")
    out.append((full[at:], False))
    for i, message in enumerate(messages):
        if message["content"].strip() not in full:
            raise ValueError(f"message {i} ({message['role']}): its content is not in what the template writes")
    return [(text, trained) for text, trained in out if text]


def as_messages(prompt: str, completion: str) -> Messages:
    """A prompt and its completion as a conversation: the user asks, the assistant answers."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def jinja_render(template: str) -> Render:
    """`template` compiled as transformers compiles chat templates (a sandbox, trim_blocks, lstrip_blocks, loop
    controls, raise_exception), rendered with PLACEHOLDERS. jinja2.TemplateSyntaxError on a bad template."""
    import json

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} … {% endgeneration %}: here just its body
        tags = {"generation"}

        def parse(self, parser: Any) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return lambda messages, add_generation_prompt: compiled.render(
        messages=messages, add_generation_prompt=add_generation_prompt, **PLACEHOLDERS)


def template_problem(template: str, conversations: bool) -> str | None:
    """What is wrong with `template` (None: nothing), found by rendering the samples: SAMPLE_PAIR, and with
    `conversations` (a messages column) SAMPLE_CHAT too."""
    try:
        import jinja2
    except ImportError:
        return "checking a chat template needs jinja2 (pip install jinja2; transformers renders templates with it)"
    try:
        render = jinja_render(template)
    except jinja2.TemplateSyntaxError as e:
        return f"line {e.lineno} of the template: {e.message}"
    for sample in [SAMPLE_PAIR] + ([SAMPLE_CHAT] if conversations else []):
        try:
            pieces = segments(render, sample)
        except jinja2.TemplateError as e:
            return f"rendering the sample conversation {sample}: {type(e).__name__}: {e}"
        except ValueError as e:
            return f"the sample conversation {sample}: {e}"
        answers = [m["content"] for m in sample if m["role"] == "assistant"]
        for (text, _), answer in zip([p for p in pieces if p[1]], answers, strict=True):
            if not text.lstrip().startswith(answer):
                return (f"the sample answer {answer!r} is written as {text!r}: what follows the generation prompt "
                        "must be the answer itself (write the assistant's header under "
                        "{% if add_generation_prompt %}, as transformers' chat templates do)")
    return None


def check_columns(data: Data, kind: str) -> None:
    """A Problem where a stage of `kind` whose data the sft head reads names text columns in its data section: the
    head reads the columns its own section names."""
    if "text_field" in data.model_fields_set or data.text_pair_field is not None:
        key = "text_field" if "text_field" in data.model_fields_set else "text_pair_field"
        raise Problem(("data", key), f"{kind} reads the columns its sft section names (prompt_field, "
                      "completion_field or messages_field); leave data.text_field and text_pair_field out")


class SftOptions(Strict):
    """The manifest's `sft:` section."""

    prompt_field: str = Field("prompt", description="Column with each example's prompt (without messages_field).")
    completion_field: str = Field("completion", description="Column with the completion the model learns to write.")
    messages_field: str | None = Field(
        None, description="Column holding a conversation per example, a list of {role, content} (roles system, "
        "user, assistant); the assistant turns are trained. Null: prompt_field and completion_field.")
    template: str | None = Field(
        None, description="A Jinja chat template (as transformers' chat_template) for a tokenizer that has none; "
        "checked at validate by rendering sample conversations. Default for such a tokenizer: "
        "`user: <prompt><end>assistant: <completion><end>` with its EOS (else [SEP]) as <end>. final/'s tokenizer "
        "saves the template used.")
    train_on_prompt: bool = Field(False, description="Train on every token, the prompt's too; default: only on the "
                                  "completion's (the assistant turns') tokens.")
    packing: bool = Field(
        False, description="Pack each micro-batch's examples into rows of up to data.max_length tokens, each "
        "example attending only to itself (position ids restart per example); llama, qwen2, qwen3, mistral and "
        "gpt2 models. Default: one example per row, rows padded to the longest of the micro-batch.")
    group_by_length: bool = Field(
        True, description="Draw examples of similar length into the same micro-batch (less padding): the shuffled "
        "order is sorted by length within windows of 16 global batches, a function of seed and epoch alone.")
    max_new_tokens: int = Field(32, ge=0, le=65536, strict=True, description="Eval: the longest greedy "
                                "generation per eval prompt (it stops at the end token); 0: no generation and no "
                                "exact_match.")
    label_set: list[str] | None = Field(
        None, min_length=2, description="The completions are these labels: eval also reports accuracy, the label "
        "whose tokens the model finds likeliest after each prompt against the reference; every eval completion "
        "must be one of them.")

    @model_validator(mode="after")
    def _template(self) -> SftOptions:
        if self.template is not None:
            problem = template_problem(self.template, conversations=self.messages_field is not None)
            if problem is not None:
                raise Problem(("template",), problem)
        if self.label_set is not None and len({" ".join(x.split()) for x in self.label_set}) != len(self.label_set):
            raise Problem(("label_set",), "labels repeat (compared with whitespace normalised)")
        return self

    def unreported(self) -> frozenset[str]:
        """The head's metrics these settings leave out: exact_match without generation, accuracy without labels."""
        return frozenset({"exact_match"} if self.max_new_tokens == 0 else ()) | frozenset(
            {"accuracy"} if self.label_set is None else ())

    def text_column(self) -> str:
        """The column the data must hold as text (or conversations): the launcher checks it before launch."""
        return self.messages_field or self.prompt_field


class PreferenceOptions(SftOptions):
    """The `sft:` section of a preference stage (dpo): each row holds a prompt and two answers, the chosen one (in
    completion_field) and the rejected one; both are written by the same template, and only the last answer of each
    is trained on (the rest is the shared prompt). Pairs are drawn in the shuffled order of every training kind:
    group_by_length does not apply."""

    completion_field: str = Field("chosen", description="Column with the chosen (preferred) completion.")
    rejected_field: str = Field(
        "rejected", description="Column with the rejected completion; with messages_field, the column holding the "
        "rejected conversation: the chosen one's messages with another last assistant answer.")

    @model_validator(mode="after")
    def _pairs(self) -> PreferenceOptions:
        if self.train_on_prompt:
            raise Problem(("train_on_prompt",), "a preference compares the two answers' log-probabilities; the "
                          "prompt they share is never trained on")
        if self.packing:
            raise Problem(("packing",), "preference pairs are batched one answer per row; leave packing out")
        return self


# exact_match and accuracy are reported where the stage asks for them (a kind's metric_names says which)
HEAD = HeadInfo(name="sft", metrics=("eval_loss", "perplexity", "exact_match", "accuracy"), fits="text",
                model="AutoModelForCausalLM", classes="vocab_size", settings=SftOptions, storable=False,
                unlabelled=False)
