"""Kept so that ``--config=configs/sft.py:<preset>`` works from a checkout: the SFT presets live in
``easyppo/configs/sft.py`` (installed with the package, named ``--config=sft:<preset>`` from anywhere)."""

from easyppo.configs.sft import PRESETS, get_config

__all__ = ["PRESETS", "get_config"]
