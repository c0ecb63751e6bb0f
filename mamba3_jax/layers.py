"""Flax NNX modules: thin holders of parameters around the pure functions in `mamba3_jax.ops`.

The Mamba-3 mixer and the residual Block. Building blocks shared with the baselines (Linear
init, RMSNorm, SwiGLU, Frozen) live in `mamba3_jax.nn`; this module imports the baselines'
mixers, never the other way round."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mamba3_jax.backends import mixer_core, step_backend
from mamba3_jax.baselines.attention import Attention
from mamba3_jax.baselines.gated_deltanet import GatedDeltaNet
from mamba3_jax.baselines.mamba2 import Mamba2
from mamba3_jax.config import ModelConfig
from mamba3_jax.nn import Frozen, RMSNorm, SwiGLU, linear, matmul, torch_linear_init
from mamba3_jax.ops.discretization import init_dt_bias
from mamba3_jax.ops.mixer import (
    MixerCache,
    causal_conv,
    empty_conv_window,
    prepare,
    split_in_proj,
)
from mamba3_jax.ops.ssm import SSMState


class Mamba3(nnx.Module):
    """The Mamba-3 mixer (SISO or MIMO rank R). Weight layout: see docs/weights.md."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        H, R, P, N = cfg.nheads, cfg.mimo_rank, cfg.headdim, cfg.d_state
        self.in_proj = linear(cfg.d_model, cfg.d_in_proj, cfg, rngs)
        self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), H, cfg.dt_min, cfg.dt_max,
                                              cfg.dt_init_floor))
        self.B_norm = nnx.Param(jnp.ones((N,), jnp.float32))
        self.C_norm = nnx.Param(jnp.ones((N,), jnp.float32))
        if cfg.bc_bias:
            kind = nnx.Param if cfg.bc_bias_trainable else Frozen
            self.B_bias = kind(jnp.full((H, R, N), cfg.bc_bias_init, jnp.float32))
            self.C_bias = kind(jnp.full((H, R, N), cfg.bc_bias_init, jnp.float32))
        else:
            self.B_bias = self.C_bias = None
        self.D = nnx.Param(jnp.ones((H,), jnp.float32))
        if R > 1:
            self.mimo_x = nnx.Param(jnp.full((H, R, P), 1.0 / R, jnp.float32))
            self.mimo_z = nnx.Param(jnp.ones((H, R, P), jnp.float32))
            self.mimo_o = nnx.Param(jnp.full((H, R, P), 1.0 / R, jnp.float32))
        else:
            self.mimo_x = self.mimo_z = self.mimo_o = None
        self.norm = nnx.Param(jnp.ones((H, P), jnp.float32)) if cfg.is_outproj_norm else None
        if cfg.d_conv:
            ch = cfg.conv_channels
            self.conv_weight = nnx.Param(torch_linear_init(cfg.d_conv)(rngs.params(),
                                                                       (cfg.d_conv, ch)))
            self.conv_bias = nnx.Param(jnp.zeros((ch,), jnp.float32))
        else:
            self.conv_weight = self.conv_bias = None
        # residual-branch output: PyTorch init scaled by 1/sqrt(2 n_layer) (two residuals a block)
        self.out_proj = linear(cfg.d_inner, cfg.d_model, cfg, rngs,
                               scale=1.0 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _value(v):
        return None if v is None else v[...]

    def _in_proj_parts(self, u: jax.Array) -> dict:
        """in_proj as two matmuls over its columns: z, x, B, C, then the per-head scalars and
        angles. With one matmul XLA stored the whole (B, L, 3432) output time-minor on the 180M
        step, so that the kernels' (B, H, L) per-head scalars came for free, and every wide part
        was transposed instead (docs/step_hlo_180m.md). Same parameter, same maths.
        One token (decode): one matmul. Inside a decode scan XLA copied the two column slices
        of the weight out of it at every step (22-32 us of a 150-290 us layer step on an H200,
        more than the matmuls themselves)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        splits = cfg.in_proj_splits
        kernel = self.in_proj.kernel[...]
        parts = {}
        bounds = (0, 4, len(splits))  # z, x, B, C | the rest
        if u.shape[-2] == 1:
            bounds = (0, len(splits))
        starts = [sum(w for _, w in splits[:i]) for i in bounds]
        groups = [(slice(a, b), splits[i:j]) for a, b, i, j in
                  zip(starts, starts[1:], bounds, bounds[1:], strict=False)]
        for cols, group in groups:
            out = matmul(u, kernel[:, cols], dtype)
            # checkpoint_name: what a "names:..." remat policy may keep (config.REMAT_NAMES)
            parts.update(split_in_proj(checkpoint_name(out, "in_proj"), cfg, group))
        return parts

    def init_cache(self, batch: int) -> MixerCache:
        cfg = self.cfg
        ssm = SSMState.zeros(batch, cfg.nheads, cfg.headdim, cfg.d_state, cfg.num_rope_angles,
                             cfg.mimo_rank, dtype=jnp.dtype(cfg.dtype),
                             state_dtype=jnp.dtype(cfg.state_dtype))
        return MixerCache(ssm=ssm, conv=empty_conv_window(cfg, batch))

    def __call__(self, u: jax.Array, *, reset: Optional[jax.Array] = None,
                 cache: Optional[MixerCache] = None, backend: Optional[str] = None):
        """u (B, L, d_model) -> (out (B, L, d_model), cache after the last token)."""
        cfg = self.cfg
        B, L, _ = u.shape
        if cache is None:
            cache = self.init_cache(B)
        parts = self._in_proj_parts(u)
        conv_window = None
        if cfg.d_conv:
            e, w = cfg.d_inner, cfg.bc_width
            xbc = jnp.concatenate([parts["x"], parts["B"], parts["C"]], axis=-1)
            xbc, conv_window = causal_conv(xbc, self.conv_weight[...], self.conv_bias[...],
                                           reset, cache.conv)
            parts.update(x=xbc[..., :e], B=xbc[..., e:e + w], C=xbc[..., e + w:])
        p = {"dt_bias": self.dt_bias[...], "B_norm": self.B_norm[...],
             "C_norm": self.C_norm[...], "B_bias": self._value(self.B_bias),
             "C_bias": self._value(self.C_bias)}
        inp = prepare(parts, p, cfg, reset)
        z = parts["z"].reshape(B, L, cfg.nheads, cfg.headdim)
        y, ssm_state = mixer_core(
            inp, cache.ssm, backend=backend or cfg.scan_backend, z=z, D=self.D[...],
            mimo_x=self._value(self.mimo_x), mimo_z=self._value(self.mimo_z),
            mimo_o=self._value(self.mimo_o), norm_weight=self._value(self.norm),
            chunk_size=cfg.resolved_chunk_size, norm_eps=1e-5)
        # cast here (out_proj computes in cfg.dtype anyway) so a saved "ssm_out" is that size
        y = checkpoint_name(y.reshape(B, L, cfg.d_inner).astype(jnp.dtype(cfg.dtype)), "ssm_out")
        out = self.out_proj(y)
        return out, MixerCache(ssm=ssm_state, conv=conv_window)

    def step(self, u: jax.Array, cache: MixerCache):
        """One token: u (B, d_model) -> (out (B, d_model), cache).

        The step backend (`backends.step_backend`): on a GPU, `auto` runs the fused Pallas
        decode kernel or the XLA step, whichever measured faster for the state's dtype, N and
        rank; a named Pallas backend always runs the kernel; with a short conv, or elsewhere,
        the reference form with L = 1."""
        backend = "reference" if self.cfg.d_conv else step_backend(self.cfg.scan_backend)
        out, cache = self(u[:, None], cache=cache, backend=backend)
        return out[:, 0], cache


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)); x + MLP(norm(x)). The mixer is Mamba-3,
    Mamba-2, attention or Gated DeltaNet (`cfg.layer_mixer(layer)`); attention + this block is
    Transformer++."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        mixers = {"mamba3": Mamba3, "mamba2": Mamba2, "attention": Attention,
                  "gated_deltanet": GatedDeltaNet}
        self.mixer = mixers[cfg.layer_mixer(layer)](cfg, rngs=rngs)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x, *, reset=None, cache=None, backend=None):
        y, cache = self.mixer(self.norm1(x), reset=reset, cache=cache, backend=backend)
        x = x + checkpoint_name(y, "mixer_out")
        return x + self.mlp(self.norm2(x)), cache

    def step(self, x, cache):
        """One decode token: x (B, d_model) -> (x (B, d_model), cache)."""
        y, cache = self.mixer.step(self.norm1(x), cache)
        x = x + y
        return x + self.mlp(self.norm2(x)), cache
