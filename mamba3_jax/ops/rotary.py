"""Rotary embedding of B and C: the Mamba-3 "complex-valued state" via the RoPE trick.

Convention (internal, fixed): channel pairs are adjacent, (2i, 2i+1) for i < S, so the first 2S
of the N channels rotate and the rest pass through. The reference MIMO kernels pair (i, i + N/2);
`docs/weights.md` gives the channel permutation that converts such checkpoints.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

TWO_PI = 2.0 * math.pi


def rotate(u: jax.Array, theta: jax.Array) -> jax.Array:
    """Rotate the first 2S channels of u (..., N) by theta (..., S) in adjacent pairs.

    (a, b) -> (a cos - b sin, a sin + b cos). Computed in float32, returned in float32.
    """
    s = theta.shape[-1]
    u = u.astype(jnp.float32)
    if s == 0:
        return u
    pairs = u[..., : 2 * s].reshape(*u.shape[:-1], s, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, sn = jnp.cos(theta), jnp.sin(theta)
    rot = jnp.stack([a * c - b * sn, a * sn + b * c], axis=-1).reshape(*u.shape[:-1], 2 * s)
    return jnp.concatenate([rot, u[..., 2 * s:]], axis=-1)


def data_dependent_rate(angle_proj: jax.Array) -> jax.Array:
    """pi tanh(angles_t), shared by the heads: (..., S) -> (..., 1, S) float32."""
    return math.pi * jnp.tanh(angle_proj.astype(jnp.float32))[..., None, :]


def increments_from(rate: jax.Array, dt: jax.Array) -> jax.Array:
    """Per-head increments rate[h // (H / Ha)] * dt[h]: (..., Ha, S), (..., H) -> (..., H, S)."""
    H, Ha = dt.shape[-1], rate.shape[-2]
    if Ha != H:
        rate = jnp.repeat(rate, H // Ha, axis=-2)
    return rate * dt[..., :, None]


def data_dependent_increments(angle_proj: jax.Array, dt: jax.Array) -> jax.Array:
    """Per-head increments pi tanh(angles_t) dt_t[h]: (..., S), (..., H) -> (..., H, S)."""
    return increments_from(data_dependent_rate(angle_proj), dt)


def linear_scan(decay: jax.Array, update: jax.Array, axis: int = 1) -> jax.Array:
    """All h_t of h_t = decay_t * h_{t-1} + update_t (h_{-1} = 0) with jax.lax.associative_scan.

    `decay` broadcasts against `update` from the left (its trailing axes may be missing).
    """
    extra = update.ndim - decay.ndim

    def expand(d):
        return d.reshape(d.shape + (1,) * extra)

    def combine(left, right):
        d1, u1 = left
        d2, u2 = right
        return d1 * d2, expand(d2) * u1 + u2

    _, h = jax.lax.associative_scan(combine, (decay, update), axis=axis)
    return h


def cumulative_angles(inc: jax.Array, reset: Optional[jax.Array],
                      angle0: Optional[jax.Array]) -> jax.Array:
    """theta_t = theta_{t-1} + inc_t, restarting from 0 where `reset` (B, L) is set.

    inc (B, L, H, S); angle0 (B, H, S) is theta_{-1}. Returns (B, L, H, S) float32.
    """
    inc = inc.astype(jnp.float32)
    keep = (jnp.ones(inc.shape[:2], jnp.float32) if reset is None
            else 1.0 - reset.astype(jnp.float32))
    if angle0 is not None:
        inc = inc.at[:, 0].add(keep[:, 0, None, None] * angle0.astype(jnp.float32))
    return linear_scan(keep, inc, axis=1)
