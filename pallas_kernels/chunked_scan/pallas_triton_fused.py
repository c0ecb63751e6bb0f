"""Inference forward (no autodiff) of the chunked scan with everything in two kernels.

SISO without the per-head RMSNorm. Compared with the training path (rotated q, k rows per head
written by `rotate_qk`, then the SSD core, then the gate in XLA), nothing per head is written
but the chunk states and the output: both kernels add the bias and rotate the group's q, k in
registers (the rotation pairs in column blocks, `to_pair_blocks` order) from the angle
increments, and the output kernel applies D and the gate.

  `_state_kernel`   grid (B, H, P / bp), chunks in order: cumulative angles (carried across
                    chunks), rotated k, the state entering every chunk (input dtype) and the
                    angle entering every chunk; the final state and angle.
  `_output_kernel`  grid (B, H, chunks): rotated q, k, masked q k^T @ x, the readout of the state
                    entering the chunk, + D x, * silu(z); output in the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba3_jax.ops.rotary import TWO_PI
from pallas_kernels._compat import SQ, compiler_params, dot, dot_precision
from pallas_kernels.chunked_scan.pallas_triton import _chunk_decays, _weights
from pallas_kernels.chunked_scan.pallas_triton_rotary import _biased, _theta

f32 = jnp.float32


def _rotated(ref, bias_ref, cos, sin, S, N, cdt, rows=slice(None)):
    """Rows of a group ref (all, or the `rows` slice) plus the head's bias, rotated: tiles
    [pair 1, pair 2, plain] in the input dtype."""
    def part(off, w):
        return _biased(ref, bias_ref[pl.ds(off, w)], off, w, cdt, rows)

    a, b = part(0, S), part(S, S)
    out = [(a * cos - b * sin).astype(cdt), (a * sin + b * cos).astype(cdt)]
    if N > 2 * S:
        out.append(part(2 * S, N - 2 * S).astype(cdt))
    return out


def _cols(S, N):
    return [(0, S), (S, S)] + ([(2 * S, N - 2 * S)] if N > 2 * S else [])


def _state_kernel(k_ref, kb_ref, inc_ref, a0_ref, x_ref, cs_ref, sc_ref, sg_ref, g0_ref,
                  st_ref, ain_ref, gl_ref, al_ref, *, C, S, N, nc, cdt, prec, aprec):
    cols = _cols(S, N)
    row = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0)

    def body(c, carry):
        g, A = carry[:-1], carry[-1]
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        cs, sc, seg = cs_ref[rows], sc_ref[rows], sg_ref[rows]
        th, _ = _theta(inc_ref[rows, :], A, seg, aprec)
        ain_ref[c] = A
        for (off, w), gp in zip(cols, g, strict=True):
            st_ref[c, :, pl.ds(off, w)] = gp.astype(st_ref.dtype)
        kr = _rotated(k_ref, kb_ref, jnp.cos(th), jnp.sin(th), S, N, cdt, rows)
        _, to_end, dec = _chunk_decays(cs, seg)
        wgt = (to_end * sc)[:, None]
        x = x_ref[rows, :]
        new = [dec * gp + dot(x, (kp.astype(f32) * wgt).astype(cdt), ta=True, precision=prec)
               for gp, kp in zip(g, kr, strict=True)]
        A = jnp.mod(jnp.sum(jnp.where(row == C - 1, th, 0.0), axis=0), TWO_PI)
        return (*new, A)

    g0 = [g0_ref[:, pl.ds(off, w)].astype(f32) for off, w in cols]
    out = jax.lax.fori_loop(0, nc, body, (*g0, a0_ref[...].astype(f32)))
    for (off, w), gp in zip(cols, out[:-1], strict=True):
        gl_ref[:, pl.ds(off, w)] = gp
    al_ref[...] = out[-1]


def _output_kernel(q_ref, k_ref, qb_ref, kb_ref, inc_ref, ain_ref, x_ref, z_ref, d_ref, cs_ref,
                   sc_ref, gm_ref, sg_ref, st_ref, out_ref, *, S, N, cdt, prec, aprec):
    cs, seg = cs_ref[...], sg_ref[...]
    th, _ = _theta(inc_ref[...], ain_ref[...], seg, aprec)
    cos, sin = jnp.cos(th), jnp.sin(th)
    q = _rotated(q_ref, qb_ref, cos, sin, S, N, cdt)
    k = _rotated(k_ref, kb_ref, cos, sin, S, N, cdt)
    s = sum(dot(a, b, tb=True, precision=prec) for a, b in zip(q, k, strict=True))
    W, _, _ = _weights(cs, sc_ref[...], gm_ref[...], seg, 1)
    x = x_ref[...]
    y = dot((s * W).astype(cdt), x, precision=prec)
    e = jnp.where(seg == 0, jnp.exp(cs), 0.0)
    y_in = sum(dot(a, st_ref[:, pl.ds(off, w)], tb=True, precision=prec)
               for a, (off, w) in zip(q, _cols(S, N), strict=True))
    y = y + e[:, None] * y_in + d_ref[...][None, :] * x.astype(f32)
    zf = z_ref[...].astype(f32)
    out_ref[...] = (y * zf / (1.0 + jnp.exp(-zf))).astype(out_ref.dtype)


def fused_forward(q, k, qb, kb, inc, a0, x, z, D, cs, sc, gm, seg, g0, *, C, interpret,
                  warps_state=4, warps_output=4, angle_mode="tf32x3", f32_mode="tf32x3"):
    """q, k (B, Lp, G, N) in pair-block order; qb, kb (H, N) f32; inc (B, Lp, H, S) f32;
    a0 (B, H, S); x, z (B, Lp, H, P); D (H,); cs, sc, gm (B, H, Lp); seg (B, Lp); g0 (B, H, P, N)
    in pair-block order. Returns out (B, Lp, H, P) in x's dtype, final state (pair-block order)
    and final angle."""
    B, Lp, G, N = q.shape
    H, P, S = x.shape[2], x.shape[3], inc.shape[-1]
    nc, hg, cdt = Lp // C, H // G, jnp.dtype(x.dtype)
    prec = dot_precision(cdt, interpret, f32_mode)
    aprec = dot_precision(f32, interpret, angle_mode)
    static = dict(S=S, N=N, cdt=cdt, prec=prec, aprec=aprec)

    def params(w):
        return None if interpret else compiler_params(w, 2)

    seq = lambda w: pl.BlockSpec((SQ, Lp, SQ, w), lambda b, h: (b, 0, h, 0))  # noqa: E731
    grp = pl.BlockSpec((SQ, Lp, SQ, N), lambda b, h: (b, 0, h // hg, 0))
    per_row = pl.BlockSpec((SQ, SQ, Lp), lambda b, h: (b, h, 0))
    states, ain, g_last, a_last = pl.pallas_call(
        functools.partial(_state_kernel, C=C, nc=nc, **static),
        grid=(B, H),
        in_specs=[grp, pl.BlockSpec((SQ, N), lambda b, h: (h, 0)), seq(S),
                  pl.BlockSpec((SQ, SQ, S), lambda b, h: (b, h, 0)), seq(P), per_row, per_row,
                  pl.BlockSpec((SQ, Lp), lambda b, h: (b, 0)),
                  pl.BlockSpec((SQ, SQ, P, N), lambda b, h: (b, h, 0, 0))],
        out_specs=[pl.BlockSpec((SQ, SQ, nc, P, N), lambda b, h: (b, h, 0, 0, 0)),
                   pl.BlockSpec((SQ, SQ, nc, S), lambda b, h: (b, h, 0, 0)),
                   pl.BlockSpec((SQ, SQ, P, N), lambda b, h: (b, h, 0, 0)),
                   pl.BlockSpec((SQ, SQ, S), lambda b, h: (b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, nc, P, N), cdt),
                   jax.ShapeDtypeStruct((B, H, nc, S), f32),
                   jax.ShapeDtypeStruct((B, H, P, N), f32),
                   jax.ShapeDtypeStruct((B, H, S), f32)],
        interpret=interpret, compiler_params=params(warps_state),
        name="mamba3_fused_state",
    )(k, kb, inc, a0, x, cs, sc, seg, g0)

    chunk = lambda w: pl.BlockSpec((SQ, C, SQ, w), lambda b, h, c: (b, c, h, 0))  # noqa: E731
    cgrp = pl.BlockSpec((SQ, C, SQ, N), lambda b, h, c: (b, c, h // hg, 0))
    crow = pl.BlockSpec((SQ, SQ, C), lambda b, h, c: (b, h, c))
    out = pl.pallas_call(
        functools.partial(_output_kernel, **static),
        grid=(B, H, nc),
        in_specs=[cgrp, cgrp, pl.BlockSpec((SQ, N), lambda b, h, c: (h, 0)),
                  pl.BlockSpec((SQ, N), lambda b, h, c: (h, 0)), chunk(S),
                  pl.BlockSpec((SQ, SQ, SQ, S), lambda b, h, c: (b, h, c, 0)), chunk(P),
                  chunk(P), pl.BlockSpec((SQ, P), lambda b, h, c: (h, 0)), crow, crow, crow,
                  pl.BlockSpec((SQ, C), lambda b, h, c: (b, c)),
                  pl.BlockSpec((SQ, SQ, SQ, P, N), lambda b, h, c: (b, h, c, 0, 0))],
        out_specs=chunk(P),
        out_shape=jax.ShapeDtypeStruct((B, Lp, H, P), cdt),
        interpret=interpret, compiler_params=params(warps_output),
        name="mamba3_fused_output",
    )(q, k, qb, kb, inc, ain, x, z, jnp.broadcast_to(D.astype(f32)[:, None], (H, P)), cs, sc, gm,
      seg, states)
    return out, g_last, a_last
