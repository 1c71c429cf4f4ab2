"""easyppo: preference tuning (SFT, reward models, DPO, PPO) of LLaMA-family models in JAX.

``easyppo.load_hf`` / ``easyppo.save_hf`` are the Hugging Face loaders of ``easyppo.weights``,
imported on first use so that importing one layer (``easyppo.core``) does not import them all.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_hf", "save_hf"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("easyppo.weights.huggingface"), name)
    raise AttributeError(f"module 'easyppo' has no attribute {name!r}")
