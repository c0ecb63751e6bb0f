"""The Mamba-3 language model: tied embedding, pre-norm [Mamba-3, SwiGLU] blocks, final RMSNorm.

Usage:
    model = Mamba3LM(ModelConfig(...), rngs=nnx.Rngs(0))
    logits = model(tokens, segment_ids=...)                 # training / scoring
    logits, cache = model(prompt, return_cache=True)        # prefill
    logits_t, cache = model.step(next_token, cache)         # decode one token
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mamba3_jax.config import ModelConfig
from mamba3_jax.layers import Block, Frozen, RMSNorm
from mamba3_jax.ops.ssm import reset_from_positions, reset_from_segment_ids


def segment_reset(segment_ids: Optional[jax.Array], positions: Optional[jax.Array]):
    """Where packed documents start: from positions (== 0) if given, else from segment ids."""
    if positions is not None:
        return reset_from_positions(positions)
    if segment_ids is not None:
        return reset_from_segment_ids(segment_ids)
    return None


class Mamba3LM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                               param_dtype=jnp.dtype(cfg.param_dtype),
                               embedding_init=nnx.initializers.normal(cfg.initializer_range),
                               rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(nnx.initializers.normal(cfg.initializer_range)(
                rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype)))

    def init_cache(self, batch: int):
        return [layer.mixer.init_cache(batch) for layer in self.layers]

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.final_norm(h).astype(jnp.dtype(self.cfg.dtype))
        w = (self.embed.embedding[...].T if self.lm_head is None else self.lm_head[...])
        return jnp.einsum("...d,dv->...v", h, w.astype(h.dtype),
                          preferred_element_type=jnp.float32)

    def features(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None, cache=None,
                 backend: Optional[str] = None):
        """tokens (B, L) -> (residual stream after the last block (B, L, d) float32, caches).

        `logits(features)` gives the logits; a loss can apply it chunk by chunk to keep the
        (B, L, V) logits out of memory (see `mamba3_jax.training.step`)."""
        reset = segment_reset(segment_ids, positions)
        h = self.embed(tokens).astype(jnp.float32)  # residual stream kept in float32
        caches = self.init_cache(tokens.shape[0]) if cache is None else cache
        new_caches = []
        for layer, c in zip(self.layers, caches, strict=True):
            h, c = layer(h, reset=reset, cache=c, backend=backend)
            new_caches.append(c)
        return h, new_caches

    def __call__(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None, cache=None, return_cache: bool = False,
                 backend: Optional[str] = None):
        """tokens (B, L) int -> logits (B, L, V) float32 [, cache].

        Packed sequences: pass `positions` (restart at 0 per document) or `segment_ids`; the
        recurrent state restarts at each document start.
        """
        h, caches = self.features(tokens, segment_ids=segment_ids, positions=positions,
                                  cache=cache, backend=backend)
        logits = self.logits(h)
        return (logits, caches) if return_cache else logits

    def step(self, token: jax.Array, cache):
        """Decode one token per sequence: token (B,) -> (logits (B, V), cache)."""
        h = self.embed(token).astype(jnp.float32)
        new_caches = []
        for layer, c in zip(self.layers, cache, strict=True):
            y, c = layer.mixer.step(layer.norm1(h), c)
            h = h + y
            h = h + layer.mlp(layer.norm2(h))
            new_caches.append(c)
        return self.logits(h), new_caches


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (nnx.Param leaves); frozen buffers are not counted."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count_frozen(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, Frozen)))
