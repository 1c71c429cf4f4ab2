"""Kept so that ``--config=configs/dpo.py:<preset>`` works from a checkout: the DPO presets live in
``easyppo/configs/dpo.py`` (installed with the package, named ``--config=dpo:<preset>`` from anywhere)."""

from easyppo.configs.dpo import PRESETS, get_config

__all__ = ["PRESETS", "get_config"]
