"""Building blocks shared by every mixer and block (Mamba-3, the baselines, hybrids).

This module depends only on the config and the pure ops, never on a mixer module, so the
Mamba-3 layers and the baselines can both import it and keep their dependencies one-way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mamba3_jax.config import ModelConfig
from mamba3_jax.ops.norms import rms_norm


class Frozen(nnx.Variable):
    """A fixed array saved with the model but not trained (e.g. frozen B/C biases)."""


def torch_linear_init(fan_in: int, scale: float = 1.0):
    """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times `scale`."""
    bound = scale / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(d_in, d_out, cfg: ModelConfig, rngs, scale: float = 1.0) -> nnx.Linear:
    """Bias-free Linear in the config's compute / master dtypes with PyTorch's init."""
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype),
                      kernel_init=torch_linear_init(d_in, scale), rngs=rngs)


def matmul(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """x @ kernel in `dtype` (both cast), as a bias-free nnx.Linear computes it."""
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                               (((x.ndim - 1,), (0,)), ((), ())))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


class SwiGLU(nnx.Module):
    """fc1 -> [value, gate] -> value * silu(gate) -> fc2 (the reference GatedMLP layout)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        f = cfg.resolved_d_mlp
        self.hidden = f
        self.fc1 = linear(cfg.d_model, 2 * f, cfg, rngs)
        self.fc2 = linear(f, cfg.d_model, cfg, rngs, scale=1.0 / math.sqrt(2 * cfg.n_layer))

    def __call__(self, x):
        h = checkpoint_name(self.fc1(x), "mlp_hidden")
        value, gate = jnp.split(h, [self.hidden], axis=-1)  # gradient: one concatenate
        return checkpoint_name(self.fc2(value * jax.nn.silu(gate)), "mlp_out")
