"""`clm`: causal LM (every next token of documents packed into blocks is predicted)."""

from contract.heads import HeadInfo

HEAD = HeadInfo(name="clm", metrics=("eval_loss", "perplexity"), fits="text", model="AutoModelForCausalLM",
                classes="vocab_size")
