"""Every read and write of parameters: Hugging Face files and tensor mapping, easyppo model
checkpoints, train-run checkpoints (Orbax), loading a model section of a config, and the logit check
against ``transformers``."""
