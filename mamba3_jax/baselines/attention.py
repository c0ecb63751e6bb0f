"""Causal self-attention for the Transformer++ baseline (and attention layers of hybrids):
RoPE (or none), grouped-query heads, packed-sequence masking, a fixed-size KV cache.

The maths is in `mamba3_jax.ops.attention`; the product itself is `jax.nn.dot_product_attention`.
Heads: `cfg.attn_heads` query heads of `cfg.headdim` channels, `cfg.attn_kv_heads` key/value
heads. The decode cache holds `cfg.max_seq_len` positions.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mamba3_jax.config import ModelConfig
from mamba3_jax.nn import linear
from mamba3_jax.ops.attention import apply_rope, attend, attention_mask, segments_from_reset


class KVCache(NamedTuple):
    """Keys and values of the positions seen so far, in slots 0..pos-1 of every row."""

    k: jax.Array  # (B, T, K, D) keys, already rotated
    v: jax.Array  # (B, T, K, D)
    seg: jax.Array  # (B, T) int32 document of each slot; -1 = empty
    pos: jax.Array  # () int32 slots filled (the same for every row)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        N, K, D = cfg.resolved_attn_heads, cfg.resolved_kv_heads, cfg.headdim
        self.q_proj = linear(cfg.d_model, N * D, cfg, rngs)
        self.k_proj = linear(cfg.d_model, K * D, cfg, rngs)
        self.v_proj = linear(cfg.d_model, K * D, cfg, rngs)
        # residual-branch output, scaled like the Mamba out_proj (two residuals a block)
        self.o_proj = linear(N * D, cfg.d_model, cfg, rngs,
                             scale=1.0 / math.sqrt(2 * cfg.n_layer))

    def init_cache(self, batch: int, length: Optional[int] = None) -> KVCache:
        cfg = self.cfg
        T = length or cfg.max_seq_len
        shape = (batch, T, cfg.resolved_kv_heads, cfg.headdim)
        dt = jnp.dtype(cfg.dtype)
        return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                       seg=jnp.full((batch, T), -1, jnp.int32), pos=jnp.zeros((), jnp.int32))

    def __call__(self, u: jax.Array, *, reset: Optional[jax.Array] = None,
                 cache: Optional[KVCache] = None, backend: Optional[str] = None):
        """u (B, L, d_model) -> (out (B, L, d_model), cache after the last token). `backend`
        (the SSM scan choice) does not apply to attention."""
        del backend
        cfg = self.cfg
        B, L, _ = u.shape
        D = cfg.headdim
        q = self.q_proj(u).reshape(B, L, cfg.resolved_attn_heads, D)
        k = self.k_proj(u).reshape(B, L, cfg.resolved_kv_heads, D)
        v = self.v_proj(u).reshape(B, L, cfg.resolved_kv_heads, D)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.pos
        q_pos = start + jnp.arange(L, dtype=jnp.int32)
        if cfg.attn_rope:
            q = apply_rope(q, q_pos, cfg.rope_theta)
            k = apply_rope(k, q_pos, cfg.rope_theta)
        if cache is None:
            seg = segments_from_reset(reset, (B, L))
            out = attend(q, k, v, attention_mask(q_pos, q_pos, seg, seg))
            # the cache a prefill hands to decoding; unused (and removed by XLA) in training
            empty = self.init_cache(B, max(cfg.max_seq_len, L))
            cache = empty._replace(k=empty.k.at[:, :L].set(k.astype(empty.k.dtype)),
                                   v=empty.v.at[:, :L].set(v.astype(empty.v.dtype)),
                                   seg=empty.seg.at[:, :L].set(seg), pos=jnp.int32(L))
        else:
            # continue the document of the last filled slot (0 for an empty cache)
            prev = jnp.where(start > 0, cache.seg[:, jnp.maximum(start - 1, 0)], 0)
            seg = segments_from_reset(reset, (B, L), prev)

            def put(buf, x):  # write the new positions at slots start..start+L-1
                return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), start,
                                                           axis=1)

            cache = KVCache(k=put(cache.k, k), v=put(cache.v, v), seg=put(cache.seg, seg),
                            pos=start + L)
            k_pos = jnp.arange(cache.k.shape[1], dtype=jnp.int32)
            out = attend(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype),
                         attention_mask(q_pos, k_pos, seg, cache.seg))
        out = checkpoint_name(out.reshape(B, L, cfg.resolved_attn_heads * D), "ssm_out")
        return self.o_proj(out), cache

    def step(self, u: jax.Array, cache: KVCache):
        """One token: u (B, d_model) -> (out (B, d_model), cache)."""
        out, cache = self(u[:, None], cache=cache)
        return out[:, 0], cache
