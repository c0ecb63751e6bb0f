"""Pure functions of causal self-attention (the Transformer++ baseline and hybrid layers).

Positions are slots of a row (0, 1, ... across packed documents); documents are kept apart by
segment ids in the mask, and RoPE scores depend only on position differences, so a packed row
computes what separate sequences compute.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mamba3_jax.ops.discretization import fixed_rope_frequencies
from mamba3_jax.ops.rotary import rotate


def segments_from_reset(reset: Optional[jax.Array], shape: tuple[int, int],
                        start: jax.Array | int = 0) -> jax.Array:
    """(B, L) int32 segment ids: `start` (B,) or scalar, plus one at every document start."""
    if reset is None:
        return jnp.broadcast_to(jnp.asarray(start, jnp.int32)[..., None], shape)
    return jnp.asarray(start, jnp.int32)[..., None] + jnp.cumsum(reset.astype(jnp.int32), axis=1)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate every channel pair of x (B, L, H, D) by position x frequency (adjacent pairs, as
    `ops.rotary.rotate`); positions (L,) or (B, L). Returns x's dtype."""
    freqs = jnp.asarray(fixed_rope_frequencies(x.shape[-1] // 2, theta), jnp.float32)
    pos = jnp.asarray(positions, jnp.float32)
    angles = pos[..., None, None] * freqs  # (..., L, 1, D/2): one angle table for all heads
    if angles.ndim == 3:
        angles = angles[None]
    return rotate(x, angles).astype(x.dtype)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array,
                   k_seg: jax.Array) -> jax.Array:
    """(B, 1, T, S) bool: key s is visible to query t when it is not later and in the same
    document; empty cache slots carry segment -1 and are never visible.
    q_pos (T,), k_pos (S,); q_seg (B, T), k_seg (B, S)."""
    causal = k_pos[None, :] <= q_pos[:, None]
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] >= 0)
    return (causal[None] & same)[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q (B, T, N, D), k/v (B, S, K, D) with N a multiple of K (grouped-query attention) ->
    (B, T, N, D). `jax.nn.dot_product_attention`: cuDNN where it applies, XLA elsewhere."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
