"""Discretization of the Mamba-3 SSM: dt, data-dependent A, lambda, and the trapezoid weights.

Per token t and head h (all in float32):
  dt      = softplus(dd_dt + dt_bias)
  A       = min(-f(dd_A), -a_floor)              f = softplus | heavy_tail
  lam     = sigmoid(trap) | 1/2 | 1              (trapezoid, trapezoid_half, euler)
  alpha   = exp(A dt)                             decay, returned as log_decay = A dt
  gamma   = lam dt                                weight of the current token's input
  eta     = (1 - lam) dt                          weight of the previous token's input,
                                                  beta = eta * alpha
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class Discretized(NamedTuple):
    dt: jax.Array  # (..., H)
    log_decay: jax.Array  # (..., H), A * dt <= -a_floor * dt < 0
    gamma: jax.Array  # (..., H)
    eta: jax.Array  # (..., H)


def heavy_tail(x: jax.Array) -> jax.Array:
    """1 + x (x >= 0), 1 / (1 - x) (x < 0): positive, C1 at 0, linear rather than exponential."""
    return jnp.maximum(x, 0.0) + 1.0 / (1.0 - jnp.minimum(x, 0.0))


def a_activation(x: jax.Array, kind: str) -> jax.Array:
    if kind == "softplus":
        return jax.nn.softplus(x)
    if kind == "heavy_tail":
        return heavy_tail(x)
    raise ValueError(f"unknown a_activation {kind!r}; expected 'softplus' or 'heavy_tail'")


def discretize(
    dd_dt: jax.Array,
    dd_A: jax.Array,
    trap: Optional[jax.Array],
    dt_bias: jax.Array,
    *,
    a_activation_kind: str = "softplus",
    a_floor: float = 1e-4,
    discretization: str = "trapezoid",
) -> Discretized:
    """Per-token, per-head discretization. Inputs (..., H); `trap` only for learned lambda."""
    f32 = jnp.float32
    dt = jax.nn.softplus(dd_dt.astype(f32) + dt_bias.astype(f32))
    A = jnp.minimum(-a_activation(dd_A.astype(f32), a_activation_kind), -a_floor)
    if discretization == "trapezoid":
        if trap is None:
            raise ValueError("discretization='trapezoid' needs the trap projection")
        lam = jax.nn.sigmoid(trap.astype(f32))
    elif discretization == "trapezoid_half":
        lam = jnp.full_like(dt, 0.5)
    elif discretization == "euler":
        lam = jnp.ones_like(dt)
    else:
        raise ValueError(f"unknown discretization {discretization!r}")
    return Discretized(dt=dt, log_decay=A * dt, gamma=lam * dt, eta=(1.0 - lam) * dt)


def init_dt_bias(key: jax.Array, nheads: int, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4) -> jax.Array:
    """Inverse softplus of dt drawn log-uniformly in [dt_min, dt_max], floored (reference init)."""
    u = jax.random.uniform(key, (nheads,), jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_init_floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def fixed_rope_frequencies(num_angles: int, theta: float = 10000.0) -> np.ndarray:
    """Standard (data-independent) RoPE frequencies for the 'fixed' rotation ablation."""
    if num_angles == 0:
        return np.zeros((0,), np.float32)
    return (theta ** (-np.arange(num_angles, dtype=np.float64) / num_angles)).astype(np.float32)
