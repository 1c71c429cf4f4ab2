"""Kept so that ``--config=configs/grpo.py:<preset>`` works from a checkout: the group-RL presets live in
``easyppo/configs/grpo.py`` (installed with the package, named ``--config=grpo:<preset>`` from anywhere)."""

from easyppo.configs.grpo import PRESETS, get_config

__all__ = ["PRESETS", "get_config"]
