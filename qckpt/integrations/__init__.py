"""Drop-in qckpt for training frameworks. Each module imports its framework, which
is an optional extra: ``qckpt.integrations.transformers`` needs ``qckpt[hf]``."""
