"""`sft`: instruction tuning of a causal LM (the completion, or every assistant turn, is predicted; the prompt is
read). Its eval adds greedy generation: exact_match of every eval prompt's completion, and where the completions are
labels (sft.label_set) accuracy, the label the model finds likeliest."""

from contract.heads import HeadInfo

# exact_match and accuracy are reported where the stage asks for them (a kind's metric_names says which)
HEAD = HeadInfo(name="sft", metrics=("eval_loss", "perplexity", "exact_match", "accuracy"), fits="text",
                model="AutoModelForCausalLM", classes="vocab_size")
