"""The Mamba-3 mixer as pure functions: in_proj split -> SSM inputs -> SSM -> gated output.

The NNX module (`mamba3_jax.layers.Mamba3`) only holds parameters and calls these.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mamba3_jax.config import ModelConfig
from mamba3_jax.ops.discretization import discretize, fixed_rope_frequencies
from mamba3_jax.ops.norms import rms_norm
from mamba3_jax.ops.rotary import (
    data_dependent_increments,
    data_dependent_rate,
    increments_from,
)
from mamba3_jax.ops.ssm import SSMInputs, SSMState, lift

f32 = jnp.float32


class MixerCache(NamedTuple):
    """Decode cache of one mixer: the SSM state and, with the short-conv ablation, its window."""

    ssm: SSMState
    conv: Optional[jax.Array] = None  # (B, d_conv - 1, conv_channels): last raw conv inputs


def split_in_proj(zxbc: jax.Array, cfg: ModelConfig, splits=None) -> dict:
    """Split in_proj's output along its last axis by `cfg.in_proj_splits` (or `splits`, a run
    of them, for an output that holds only those parts).

    One `split` (not slices): its gradient is one concatenate, where slices' gradients are pads
    added together (on the 180M step XLA built that sum time-minor, then transposed it twice)."""
    names, widths = zip(*(cfg.in_proj_splits if splits is None else splits), strict=True)
    cuts = list(itertools.accumulate(widths))[:-1]
    return dict(zip(names, jnp.split(zxbc, cuts, axis=-1), strict=True))


def empty_conv_window(cfg: ModelConfig, batch: int) -> Optional[jax.Array]:
    """The causal conv's decode cache before any token: the last d_conv - 1 inputs, zeros
    (B, d_conv - 1, conv_channels); None without a conv."""
    if not cfg.d_conv:
        return None
    return jnp.zeros((batch, cfg.d_conv - 1, cfg.conv_channels), jnp.dtype(cfg.dtype))


def causal_conv(u: jax.Array, weight: jax.Array, bias: jax.Array, reset: Optional[jax.Array],
                window: Optional[jax.Array]):
    """Depthwise causal conv (+ SiLU) that does not look across segment starts.

    u (B, L, Ch); weight (K, Ch) with weight[K-1] on the current token; window (B, K-1, Ch)
    holds the previous K-1 inputs. Returns (output, new window).
    """
    K = weight.shape[0]
    B, L, _ = u.shape
    if window is None:
        window = jnp.zeros((B, K - 1) + u.shape[2:], u.dtype)
    full = jnp.concatenate([window.astype(u.dtype), u], axis=1)  # (B, K-1+L, Ch)
    r = jnp.zeros((B, L), bool) if reset is None else reset
    seg = jnp.cumsum(jnp.concatenate([jnp.zeros((B, K - 1), jnp.int32), r.astype(jnp.int32)],
                                     axis=1), axis=1)
    acc = jnp.zeros(u.shape, f32) + bias.astype(f32)
    for j in range(K):  # tap j looks j tokens back
        src = full[:, K - 1 - j:K - 1 - j + L].astype(f32)
        same = (seg[:, K - 1 - j:K - 1 - j + L] == seg[:, K - 1:])[..., None]
        acc = acc + jnp.where(same, src, 0.0) * weight[K - 1 - j].astype(f32)
    new_window = full[:, L:]
    # inputs of an older segment must not leak into the next decode step
    new_window = jnp.where((seg[:, L:] == seg[:, -1:])[..., None], new_window, 0)
    return jax.nn.silu(acc).astype(u.dtype), new_window


def angle_increments(parts: dict, dt: jax.Array, cfg: ModelConfig) -> jax.Array:
    """(B, L, H, S) rotary increments for the configured rotation mode."""
    S = cfg.num_rope_angles
    shape = dt.shape + (S,)
    if cfg.rotation == "data_dependent" and S > 0:
        # rotation_dt=False: pi tanh(angles) per step, the same for every head (not scaled by dt)
        return data_dependent_increments(parts["angles"], dt if cfg.rotation_dt
                                         else jnp.ones_like(dt))
    if cfg.rotation == "fixed":  # standard RoPE: theta_t = t * freq, independent of the data
        return jnp.broadcast_to(jnp.asarray(fixed_rope_frequencies(S, cfg.rope_theta)), shape)
    return jnp.zeros(shape, f32)


def bc_norm(v: jax.Array, norm_weight, cfg: ModelConfig, eps: float = 1e-5) -> jax.Array:
    """B or C (B, L, R*G*N) laid out (rank, group, state) -> BCNorm-ed (B, L, R, G, N)."""
    v = v.reshape(v.shape[:-1] + (cfg.mimo_rank, cfg.ngroups, cfg.d_state))
    return rms_norm(v, norm_weight, eps)


def _skip_gate(y, x, z, D):
    return (y.astype(f32) + D.astype(f32)[:, None] * x.astype(f32)) * jax.nn.silu(z.astype(f32))


@jax.custom_vjp
def skip_gate(y, x, z, D) -> jax.Array:
    """(y + D x) * silu(z) in float32: y, x, z (..., H, P), D (H,) (SISO without RMSNorm).

    Its own VJP keeps only y, x, z (as given, e.g. bf16) and forms dy, dx, dz and dD in one
    pass; autodiff's kept float32 sigmoid and silu tensors (403 MB each per layer on the 180M
    step) and spread the backward over several fusions."""
    return _skip_gate(y, x, z, D)


def _skip_gate_fwd(y, x, z, D):
    return _skip_gate(y, x, z, D), (y, x, z, D)


def skip_gate_grads(y, x, z, D, g):
    """`skip_gate`'s backward without d x: du = d(y + D x) (float32; d y is du, d x is D du),
    dz in z's dtype and dD in D's, for the output cotangent g."""
    zf, xf, Df = z.astype(f32), x.astype(f32), D.astype(f32)[:, None]
    sig = jax.nn.sigmoid(zf)
    du = g * (zf * sig)
    dz = g * (y.astype(f32) + Df * xf) * sig * (1.0 + zf * (1.0 - sig))  # silu' = s (1 + z (1 - s))
    dD = jnp.sum(du * xf, axis=tuple(range(du.ndim - 2)) + (du.ndim - 1,))
    return du, dz.astype(z.dtype), dD.astype(D.dtype)


def _skip_gate_bwd(res, g):
    y, x, z, D = res
    du, dz, dD = skip_gate_grads(y, x, z, D, g)
    return du.astype(y.dtype), (D.astype(f32)[:, None] * du).astype(x.dtype), dz, dD


skip_gate.defvjp(_skip_gate_fwd, _skip_gate_bwd)


def gate_output(y, x, z, D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None,
                eps: float = 1e-5) -> jax.Array:
    """y^(r) + D x^(r), optional per-head RMSNorm over P, times silu(z * mimo_z[r]), rank sum.

    y (B, L, R, H, P) float32; x, z (B, L, H, P); returns (B, L, H, P) float32.
    """
    if mimo_x is None and mimo_z is None and mimo_o is None and norm_weight is None:
        return skip_gate(y[..., 0, :, :], x, z, D)  # SISO (R = 1): rank 0 is y
    y = y + D.astype(f32)[:, None] * lift(x, mimo_x)
    if norm_weight is not None:
        y = rms_norm(y, norm_weight.astype(f32), eps)
    zr = lift(z, mimo_z)
    y = y * jax.nn.silu(zr)
    if mimo_o is None:
        return y[..., 0, :, :]
    return jnp.einsum("...rhp,rhp->...hp", y, jnp.swapaxes(mimo_o, 0, 1).astype(f32))


def prepare(parts: dict, p: dict, cfg: ModelConfig, reset: Optional[jax.Array]):
    """Everything between in_proj (and the optional conv) and the SSM."""
    B, L = parts["x"].shape[:2]
    H, P = cfg.nheads, cfg.headdim
    disc = discretize(parts["dd_dt"], parts["dd_A"], parts.get("trap"), p["dt_bias"],
                      a_activation_kind=cfg.a_activation, a_floor=cfg.a_floor,
                      discretization=cfg.discretization)
    x = parts["x"].reshape(B, L, H, P)
    factors = {}
    if cfg.rotation == "data_dependent" and cfg.num_rope_angles and cfg.rotation_dt:
        # the increments also as factors (B, L, 1, S) x (B, L, H): the GPU kernels form them
        # per head in registers, and XLA drops `inc` when no backend reads it
        factors = dict(angle_rate=data_dependent_rate(parts["angles"]), angle_dt=disc.dt)
        inc = increments_from(factors["angle_rate"], disc.dt)
    else:
        inc = angle_increments(parts, disc.dt, cfg)
    return SSMInputs(q=bc_norm(parts["C"], p["C_norm"], cfg),
                     k=bc_norm(parts["B"], p["B_norm"], cfg), x=x, angle_inc=inc,
                     log_decay=disc.log_decay, gamma=disc.gamma, eta=disc.eta, reset=reset,
                     q_bias=p.get("C_bias"), k_bias=p.get("B_bias"), **factors)
