"""The one typed config (model / data / finetune / train / generate / export) and its validation."""
