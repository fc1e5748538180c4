"""`clm`: causal LM (every next token of documents packed into blocks is predicted)."""

from contract.heads import HeadInfo

BLOCK_SIZE = 128  # tokens per packed block by default

HEAD = HeadInfo(name="clm", metrics=("eval_loss", "perplexity"), fits="text", model="AutoModelForCausalLM",
                classes="vocab_size", options={"block_size": BLOCK_SIZE})
