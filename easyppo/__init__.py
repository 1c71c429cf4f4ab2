"""easyppo: preference tuning (SFT, reward models, DPO, PPO) of LLaMA-family models in JAX."""

from easyppo.convert import load_hf, save_hf

__all__ = ["load_hf", "save_hf"]
__version__ = "0.1.0"
