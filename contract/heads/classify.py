"""`classify`: sequence classification (a label per example)."""

from contract.heads import HeadInfo

HEAD = HeadInfo(name="classify", metrics=("accuracy", "macro_f1", "eval_loss"), fits="classify",
                model="AutoModelForSequenceClassification", classes="num_labels")
