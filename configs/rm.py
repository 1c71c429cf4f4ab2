"""Kept so that ``--config=configs/rm.py:<preset>`` works from a checkout: the RM presets live in
``easyppo/configs/rm.py`` (installed with the package, named ``--config=rm:<preset>`` from anywhere)."""

from easyppo.configs.rm import PRESETS, get_config

__all__ = ["PRESETS", "get_config"]
