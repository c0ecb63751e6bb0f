"""Gated DeltaNet (the paper's third baseline), written from the published equations
(Yang, Kautz & Hatamizadeh, "Gated Delta Networks", 2024); the maths is in `ops/delta.py`.

Per token, with H heads of keys of N = d_state and values of P = headdim channels:
    in_proj -> gate z (H P), v (H P), k (H N), q (H N), decay input a (H), write input b (H)
    v, k, q through the short causal conv + SiLU (d_conv > 0; SiLU alone without it)
    q, k L2-normalised per head; alpha = exp(-exp(A_log) softplus(a + dt_bias))
    beta = sigmoid(b), times 2 with `negative_eigenvalues` (eigenvalues in [-1, 1])
    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,  y_t = S_t q_t
    out = out_proj(RMSNorm_P(y) * silu(z))   (one norm weight over P, shared by the heads)

in_proj reuses the Mamba layout's slot names (x = v, B = k, C = q, dd_dt = a, plus beta; see
`ModelConfig.in_proj_splits`), so the conv and the splits are the shared helpers. Backends:
"reference" runs the token loop, every other `scan_backend` the chunked form (no kernels here).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mamba3_jax.config import ModelConfig
from mamba3_jax.nn import linear, torch_linear_init
from mamba3_jax.ops.delta import delta_rule, l2_normalize
from mamba3_jax.ops.discretization import init_dt_bias
from mamba3_jax.ops.mixer import causal_conv, empty_conv_window, split_in_proj
from mamba3_jax.ops.norms import rms_norm


class DeltaCache(NamedTuple):
    """Decode cache of one Gated DeltaNet layer."""

    state: jax.Array  # (B, H, P, N) the delta-rule state S
    conv: Optional[jax.Array] = None  # (B, d_conv - 1, conv_channels): last raw conv inputs


def _form(backend: str) -> str:
    return "reference" if backend == "reference" else "chunked"


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        H = cfg.nheads
        self.in_proj = linear(cfg.d_model, cfg.d_in_proj, cfg, rngs)
        if cfg.d_conv:
            init = torch_linear_init(cfg.d_conv)
            self.conv_weight = nnx.Param(init(rngs.params(), (cfg.d_conv, cfg.conv_channels)))
            self.conv_bias = nnx.Param(jnp.zeros((cfg.conv_channels,), jnp.float32))
        else:
            self.conv_weight = self.conv_bias = None
        # decay rate as Mamba-2: dt in [dt_min, dt_max] at init, A = exp(A_log) ~ U(a_init_range)
        self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), H, cfg.dt_min, cfg.dt_max,
                                              cfg.dt_init_floor))
        lo, hi = cfg.a_init_range
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (H,), jnp.float32,
                                                          lo, hi)))
        self.norm = nnx.Param(jnp.ones((cfg.headdim,), jnp.float32))
        self.out_proj = linear(cfg.d_inner, cfg.d_model, cfg, rngs,
                               scale=1.0 / math.sqrt(2 * cfg.n_layer))

    def init_cache(self, batch: int) -> DeltaCache:
        cfg = self.cfg
        state = jnp.zeros((batch, cfg.nheads, cfg.headdim, cfg.d_state),
                          jnp.dtype(cfg.state_dtype))
        return DeltaCache(state=state, conv=empty_conv_window(cfg, batch))

    def __call__(self, u: jax.Array, *, reset: Optional[jax.Array] = None,
                 cache: Optional[DeltaCache] = None, backend: Optional[str] = None):
        """u (B, L, d_model) -> (out (B, L, d_model), cache after the last token)."""
        cfg = self.cfg
        B, L, _ = u.shape
        H, P, N = cfg.nheads, cfg.headdim, cfg.d_state
        if cache is None:
            cache = self.init_cache(B)
        parts = split_in_proj(checkpoint_name(self.in_proj(u), "in_proj"), cfg)
        e, w = cfg.d_inner, cfg.bc_width
        vkq = jnp.concatenate([parts["x"], parts["B"], parts["C"]], axis=-1)
        if cfg.d_conv:
            vkq, window = causal_conv(vkq, self.conv_weight[...], self.conv_bias[...], reset,
                                      cache.conv)
        else:
            vkq, window = jax.nn.silu(vkq), None
        v = vkq[..., :e].reshape(B, L, H, P)
        k = l2_normalize(vkq[..., e:e + w].reshape(B, L, H, N))
        q = l2_normalize(vkq[..., e + w:].reshape(B, L, H, N))
        dt = jax.nn.softplus(parts["dd_dt"].astype(jnp.float32) + self.dt_bias[...])
        log_decay = -jnp.exp(self.A_log[...]) * dt
        beta = jax.nn.sigmoid(parts["beta"].astype(jnp.float32))
        if cfg.negative_eigenvalues:
            beta = 2.0 * beta
        y, state = delta_rule(q, k, v, log_decay, beta, cache.state, reset,
                              form=_form(backend or cfg.scan_backend),
                              chunk_size=cfg.resolved_chunk_size)
        y = rms_norm(y, self.norm[...], cfg.norm_eps)
        y = y * jax.nn.silu(parts["z"].astype(jnp.float32).reshape(B, L, H, P))
        y = checkpoint_name(y.reshape(B, L, e).astype(jnp.dtype(cfg.dtype)), "ssm_out")
        return self.out_proj(y), DeltaCache(state=state, conv=window)

    def step(self, u: jax.Array, cache: DeltaCache):
        """One token: u (B, d_model) -> (out (B, d_model), cache)."""
        out, cache = self(u[:, None], cache=cache, backend="reference")
        return out[:, 0], cache
