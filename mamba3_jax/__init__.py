"""mamba3-jax: the Mamba-3 state space model in JAX / Flax NNX."""

from mamba3_jax.config import ModelConfig
from mamba3_jax.model import Mamba3LM, count_params

__all__ = ["ModelConfig", "Mamba3LM", "count_params"]
__version__ = "0.1.0"
