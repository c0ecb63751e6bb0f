"""Single-token Mamba-3 decode step as one Pallas Triton kernel.

Per (batch, head) program: angle update (mod 2 pi) and rotation of q, k in registers, the
exponential-trapezoidal rank-R state update, readout, + D x, optional per-head RMSNorm, the gate
silu(z * mimo_z) and the rank sum with mimo_o. The state (angle, h, k_prev, x_prev) is updated in
place (`input_output_aliases`; donate the cache under jit to avoid XLA's defensive copy). The SSM
state h may be stored in float32 or bfloat16; the arithmetic is float32.

Semantics: `mamba3_jax.ops.ssm.ssm_step` followed by `mamba3_jax.ops.mixer.gate_output`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba3_jax.ops.rotary import TWO_PI
from mamba3_jax.ops.ssm import SSMState
from pallas_kernels._compat import (
    SQ,
    KernelUnsupported,
    compiler_params,
    is_pow2,
    plgpu,
    swap_pairs,
)

f32 = jnp.float32


def epilogue_params(D, mimo_x, mimo_z, mimo_o, norm_weight, H, R, P):
    """The gate epilogue's per-head parameters packed as one (H, 2 + 3R, P) float32 array:
    rows [D, mimo_x (R), mimo_z (R), mimo_o (R), norm weight]; absent ones are ones."""
    ones = jnp.ones((H, R, P), f32)
    mx = ones if mimo_x is None else mimo_x.astype(f32)
    mz = ones if mimo_z is None else mimo_z.astype(f32)
    mo = ones if mimo_o is None else mimo_o.astype(f32)
    nw = jnp.ones((H, P), f32) if norm_weight is None else norm_weight.astype(f32)
    return jnp.concatenate([jnp.broadcast_to(D.astype(f32)[:, None, None], (H, 1, P)), mx, mz,
                            mo, nw[:, None, :]], axis=1)



def _pick(v, i):
    idx = jnp.arange(v.shape[0])
    return jnp.sum(jnp.where(idx == i, v, jnp.zeros_like(v)))


def _decode_kernel(q_ref, k_ref, x_ref, z_ref, inc_ref, sc_ref, prm_ref,
                   h_ref, ang_ref, kp_ref, xp_ref,
                   o_ref, h_out, ang_out, kp_out, xp_out, *, R, N, S, has_norm, eps, interpret):
    parts = []
    if S:
        parts.append((0, 2 * S, True))
    if N - 2 * S:
        parts.append((2 * S, N - 2 * S, False))
    # read all of the old state first: its buffers are aliased to the outputs
    sc = sc_ref[...].astype(f32)  # (4,): log_decay, gamma, eta, keep (0 where a segment starts)
    ld, gm, eta, keep = _pick(sc, 0), _pick(sc, 1), _pick(sc, 2), _pick(sc, 3)
    xp = xp_ref[...].astype(f32) * keep
    h_old = [h_ref[:, pl.ds(off, w)].astype(f32) for off, w, _ in parts]
    kp_old = [[kp_ref[r, pl.ds(off, w)].astype(f32) * keep for r in range(R)]
              for off, w, _ in parts]
    ang = ang_ref[...].astype(f32) * keep if S else None
    if not interpret and plgpu is not None:
        plgpu.debug_barrier()

    alpha = jnp.exp(ld)
    D = prm_ref[0, :].astype(f32)
    x = x_ref[...].astype(f32)  # (P,)
    if S:
        ang = jnp.mod(ang + inc_ref[...].astype(f32), TWO_PI)
        ang_out[...] = ang
        sgn = jnp.where(jnp.arange(2) == 0, -1.0, 1.0).astype(f32)
        cz = jnp.broadcast_to(jnp.cos(ang)[:, None], (S, 2)).reshape(2 * S)
        sn = (jnp.sin(ang)[:, None] * sgn[None, :]).reshape(2 * S)

    # h' = alpha h + eta alpha sum_r x_prev^(r) k_prev_r^T + gamma sum_r x^(r) k~_r^T; y_r = h' q~_r
    ys = [None] * R
    for j, (off, w, rotated) in enumerate(parts):
        h = h_old[j] * (alpha * keep)
        qs = []
        for r in range(R):
            mx = prm_ref[1 + r, :].astype(f32)
            k = k_ref[r, pl.ds(off, w)].astype(f32)
            q = q_ref[r, pl.ds(off, w)].astype(f32)
            if rotated:
                k = k * cz + swap_pairs(k) * sn
                q = q * cz + swap_pairs(q) * sn
            k = k.astype(kp_out.dtype)
            kp_out[r, pl.ds(off, w)] = k
            h = h + ((eta * alpha) * (xp * mx))[:, None] * kp_old[j][r][None, :]
            h = h + (gm * (x * mx))[:, None] * k.astype(f32)[None, :]
            qs.append(q)
        h_out[:, pl.ds(off, w)] = h.astype(h_out.dtype)
        for r in range(R):
            yr = jnp.sum(h * qs[r][None, :], axis=1)
            ys[r] = yr if ys[r] is None else ys[r] + yr
    xp_out[...] = x_ref[...].astype(xp_out.dtype)

    nw = prm_ref[1 + 3 * R, :].astype(f32)
    z = z_ref[...].astype(f32)
    out = jnp.zeros_like(x)
    for r in range(R):
        mx = prm_ref[1 + r, :].astype(f32)
        mz = prm_ref[1 + R + r, :].astype(f32)
        mo = prm_ref[1 + 2 * R + r, :].astype(f32)
        u = ys[r] + D * x * mx
        if has_norm:
            u = u * jax.lax.rsqrt(jnp.mean(u * u) + eps) * nw
        zr = z * mz
        u = u * zr / (1.0 + jnp.exp(-zr))
        out = out + (u if R == 1 else mo * u)
    o_ref[...] = out


def decode_step(state: SSMState, q, k, x, z, angle_inc, log_decay, gamma, eta, reset=None, *,
                D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None, norm_eps=1e-5,
                interpret: bool = False, num_warps: int = 4):
    """One token: q, k (B, R, H, N) biased, unrotated; x, z (B, H, P); angle_inc (B, H, S);
    log_decay, gamma, eta (B, H); reset (B,) bool or None. Returns (out (B, H, P) f32, state)."""
    B, R, H, N = q.shape
    P = x.shape[-1]
    S = angle_inc.shape[-1]
    if not (is_pow2(N) and N >= 16 and is_pow2(P) and P >= 16 and is_pow2(R)):
        raise KernelUnsupported(
            f"decode needs power-of-two N ({N}) >= 16, P ({P}) >= 16 and R ({R})")
    for w in (2 * S, N - 2 * S):
        if w and not (is_pow2(w) and w >= 2):
            raise KernelUnsupported(f"rotated/plain channel counts {2 * S}/{N - 2 * S} must be "
                                    f"powers of two")
    keep = jnp.ones((B,), f32) if reset is None else 1.0 - reset.astype(f32)
    sc = jnp.stack([log_decay.astype(f32), gamma.astype(f32), eta.astype(f32),
                    jnp.broadcast_to(keep[:, None], (B, H))], axis=-1)  # (B, H, 4)
    prm = epilogue_params(D, mimo_x, mimo_z, mimo_o, norm_weight, H, R, P)
    K = prm.shape[1]
    Sk = max(S, 1)
    ang = state.angle if S else jnp.zeros((B, H, 1), f32)
    inc = angle_inc.astype(f32) if S else jnp.zeros((B, H, 1), f32)

    rk = pl.BlockSpec((SQ, R, SQ, N), lambda b, h: (b, 0, h, 0))
    hp = pl.BlockSpec((SQ, SQ, P), lambda b, h: (b, h, 0))
    hs = pl.BlockSpec((SQ, SQ, Sk), lambda b, h: (b, h, 0))
    hn = pl.BlockSpec((SQ, SQ, P, N), lambda b, h: (b, h, 0, 0))
    in_specs = [rk, rk, hp, hp, hs, pl.BlockSpec((SQ, SQ, 4), lambda b, h: (b, h, 0)),
                pl.BlockSpec((SQ, K, P), lambda b, h: (h, 0, 0)), hn, hs, rk, hp]
    out_specs = [hp, hn, hs, rk, hp]
    out_shape = [jax.ShapeDtypeStruct((B, H, P), f32),
                 jax.ShapeDtypeStruct(state.h.shape, state.h.dtype),
                 jax.ShapeDtypeStruct(ang.shape, f32),
                 jax.ShapeDtypeStruct(state.k_prev.shape, state.k_prev.dtype),
                 jax.ShapeDtypeStruct(state.x_prev.shape, state.x_prev.dtype)]
    kernel = functools.partial(_decode_kernel, R=R, N=N, S=S, has_norm=norm_weight is not None,
                               eps=float(norm_eps), interpret=bool(interpret))
    out, h, ang_new, k_prev, x_prev = pl.pallas_call(
        kernel,
        grid=(B, H),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={7: 1, 8: 2, 9: 3, 10: 4},
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(num_warps, 1),
        name="mamba3_decode",
    )(q, k, x, z, inc, sc, prm, state.h, ang, state.k_prev, state.x_prev)
    new = SSMState(angle=ang_new if S else state.angle, h=h, k_prev=k_prev, x_prev=x_prev)
    return out, new
