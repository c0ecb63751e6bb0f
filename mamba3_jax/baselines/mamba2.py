"""Mamba-2 (the paper's baseline): exponential-Euler, real-valued, SISO, short conv, learned
data-independent A (A_log), post-gate RMSNorm. Semantics of `mamba_ssm/modules/mamba2.py`.

Per token and head: dt = softplus(dd_dt + dt_bias), A = -exp(A_log),
h_t = exp(A dt_t) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t,
out = out_proj(RMSNorm_groups(y * silu(z))). The SSM is our core with lambda = 1 and no rotation.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mamba3_jax.config import ModelConfig
from mamba3_jax.nn import linear, torch_linear_init
from mamba3_jax.ops.discretization import init_dt_bias
from mamba3_jax.ops.mixer import MixerCache, causal_conv, empty_conv_window, split_in_proj
from mamba3_jax.ops.norms import rms_norm
from mamba3_jax.ops.ssm import SSM_FORMS, SSMInputs, SSMState, ssm


def _form(backend: str) -> str:
    """Mamba-2 has no kernels here: named XLA forms run as asked, anything else runs chunked."""
    return backend if backend in SSM_FORMS else "chunked"


class Mamba2(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        H = cfg.nheads
        self.in_proj = linear(cfg.d_model, cfg.d_in_proj, cfg, rngs)
        self.conv_weight = nnx.Param(torch_linear_init(cfg.d_conv)(
            rngs.params(), (cfg.d_conv, cfg.conv_channels)))
        self.conv_bias = nnx.Param(torch_linear_init(cfg.d_conv)(
            rngs.params(), (cfg.conv_channels,)))
        self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), H, cfg.dt_min, cfg.dt_max,
                                              cfg.dt_init_floor))
        lo, hi = cfg.a_init_range
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (H,), jnp.float32,
                                                          lo, hi)))
        self.D = nnx.Param(jnp.ones((H,), jnp.float32))
        self.norm = nnx.Param(jnp.ones((cfg.d_inner,), jnp.float32))
        self.out_proj = linear(cfg.d_inner, cfg.d_model, cfg, rngs,
                               scale=1.0 / math.sqrt(2 * cfg.n_layer))

    def init_cache(self, batch: int) -> MixerCache:
        cfg = self.cfg
        ssm_state = SSMState.zeros(batch, cfg.nheads, cfg.headdim, cfg.d_state, 0, 1,
                                   dtype=jnp.dtype(cfg.dtype),
                                   state_dtype=jnp.dtype(cfg.state_dtype))
        return MixerCache(ssm=ssm_state, conv=empty_conv_window(cfg, batch))

    def __call__(self, u, *, reset: Optional[jax.Array] = None,
                 cache: Optional[MixerCache] = None, backend: Optional[str] = None):
        cfg = self.cfg
        B, L, _ = u.shape
        H, P, G, N = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        if cache is None:
            cache = self.init_cache(B)
        parts = split_in_proj(self.in_proj(u), cfg)
        e, w = cfg.d_inner, cfg.bc_width
        xbc = jnp.concatenate([parts["x"], parts["B"], parts["C"]], axis=-1)
        xbc, window = causal_conv(xbc, self.conv_weight[...], self.conv_bias[...], reset,
                                  cache.conv)
        x = xbc[..., :e].reshape(B, L, H, P)
        k = xbc[..., e:e + w].reshape(B, L, 1, G, N)
        q = xbc[..., e + w:].reshape(B, L, 1, G, N)
        dt = jax.nn.softplus(parts["dd_dt"].astype(jnp.float32) + self.dt_bias[...])
        A = -jnp.exp(self.A_log[...])
        inp = SSMInputs(q=q, k=k, x=x, angle_inc=jnp.zeros((B, L, H, 0), jnp.float32),
                        log_decay=A * dt, gamma=dt, eta=jnp.zeros_like(dt), reset=reset)
        y, state = ssm(inp, cache.ssm, None, form=_form(backend or cfg.scan_backend),
                       chunk_size=cfg.resolved_chunk_size)
        y = y[:, :, 0] + self.D[...][:, None] * x.astype(jnp.float32)
        y = y.reshape(B, L, e) * jax.nn.silu(parts["z"].astype(jnp.float32))
        y = rms_norm(y.reshape(B, L, G, e // G), self.norm[...].reshape(G, e // G))
        out = self.out_proj(y.reshape(B, L, e).astype(u.dtype))
        return out, MixerCache(ssm=state, conv=window)

    def step(self, u, cache: MixerCache):
        out, cache = self(u[:, None], cache=cache, backend="reference")
        return out[:, 0], cache
