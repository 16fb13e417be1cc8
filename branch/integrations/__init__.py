"""The light cone inside training frameworks. Each module imports its framework, an
optional extra: ``branch.integrations.transformers`` needs ``qckpt[hf]``."""
