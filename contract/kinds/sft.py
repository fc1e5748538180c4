"""`sft`: instruction tuning of a causal LM (supervised fine-tuning). Each example is a prompt and its completion, or
a conversation (a list of {role, content} messages), written out by a chat template; the loss counts only the
completion's (the assistant turns') tokens, per token over the global batch. Eval: loss and perplexity on those
tokens, greedy generation scored by exact match, and accuracy over a label set where the completions are labels.
The settings and the template's checks are the head's (contract/heads/sft.py).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from contract.heads.sft import SftOptions, check_columns
from contract.sections import Data, DataSection, Head, TrainingStage


class SftStage(TrainingStage):
    options_field: ClassVar[str | None] = "sft"
    scores_train: ClassVar[bool] = True
    head: ClassVar[Head | None] = "sft"

    kind: Literal["sft"] = Field(description="Instruction tuning of a causal LM: the loss on the completions only; "
                                 "eval: loss, perplexity, exact match of greedy generations, label accuracy.")
    sft: SftOptions = Field(default_factory=SftOptions, description="Columns, chat template, packing, eval.")

    @model_validator(mode="after")
    def _columns(self) -> SftStage:
        check_columns(self.data, "sft")
        return self

    def metric_names(self) -> frozenset[str]:
        return super().metric_names() - self.sft.unreported()

    def data_sections(self) -> list[DataSection]:
        # the column the data must hold as text is the prompt's (or the conversation's): the launcher checks it
        text = self.sft.text_column()
        return [DataSection(None, ("data",), Data.model_validate(self.data.model_dump() | {"text_field": text}))]

    def training_rows(self) -> dict[str, Any]:
        return {"max_length": self.data.max_length, "sft": self.sft.model_dump(
            include={"prompt_field", "completion_field", "messages_field", "template", "train_on_prompt"})}


STAGE = SftStage
