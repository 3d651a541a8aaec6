"""Training: token shards and loaders (data.py, prepare.py), tokenizer training (tokenizer.py), and the one
training loop that pretraining, SFT, GRPO and distillation share."""
