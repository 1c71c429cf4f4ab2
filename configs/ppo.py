"""Kept so that ``--config=configs/ppo.py:<preset>`` works from a checkout: the PPO presets live in
``easyppo/configs/ppo.py`` (installed with the package, named ``--config=ppo:<preset>`` from anywhere)."""

from easyppo.configs.ppo import PRESETS, get_config

__all__ = ["PRESETS", "get_config"]
