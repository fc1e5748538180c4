"""`clm`: causal LM (every next token of documents packed into blocks is predicted)."""

from contract.heads import HeadInfo
from contract.sections import BLOCK_SIZE

HEAD = HeadInfo(name="clm", metrics=("eval_loss", "perplexity"), fits="text", model="AutoModelForCausalLM",
                classes="vocab_size", options={"block_size": BLOCK_SIZE})
