"""Kept so that ``--config=configs/online_dpo.py:<preset>`` works from a checkout: the online DPO presets
live in ``easyppo/configs/online_dpo.py`` (installed with the package, ``--config=online_dpo:<preset>``)."""

from easyppo.configs.online_dpo import PRESETS, get_config

__all__ = ["PRESETS", "get_config"]
