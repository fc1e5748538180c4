"""`mlm`: masked-LM (BERT-style masking; the masked tokens are predicted)."""

from contract.heads import HeadInfo

HEAD = HeadInfo(name="mlm", metrics=("eval_loss", "perplexity"), fits="text", model="AutoModelForMaskedLM",
                classes="vocab_size", options={"mask_prob": 0.15}, storable=False)
