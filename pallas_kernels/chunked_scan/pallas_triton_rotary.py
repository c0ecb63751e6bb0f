"""Bias and data-dependent rotation of q and k per head, as Pallas Triton kernels.

    q_rot[b, t, r, h] = rotate(round(q[b, t, r, g(h)] + q_bias[h, r]), theta[b, t, h])

with theta the cumulative rotary angle: inside a chunk a segmented prefix sum of the increments
(a dot with the 0/1 matrix [s <= t, same segment]), plus the angle A carried into the chunk on
rows before the chunk's first reset. A (B, nc, H, S) comes from XLA (a short scan over chunk
totals), so every chunk is independent.

Channel layout: the kernels take q, k (and biases) with the N channels permuted so that the
rotation pairs are the column blocks [0, S) and [S, 2S) (`to_pair_blocks`): the rotation is
then elementwise on two tiles, with no pair shuffles. The SSD core does not care (q . k and the
state's channel order are permuted alike); the caller permutes the initial state in and the
final state out.

Forward and backward, grid (B, chunks, R, H): one (C, N) tile of one head per program. The
backward writes the un-rotated gradient per head in the compute dtype (XLA sums a group's heads
in float32), d(increments) of the chunk (the transposed prefix-sum dot), d A and per-chunk
partial sums of the bias gradients. (A loop over a group's heads with the sum in registers
spilled heavily and left the GPU idle at 64-token chunks: 256 programs at B 8, L 2048. On the
16-token rotation chunks, 1024 programs and no spills, it was still 13-23% slower than one
program per head at every measured shape: removed, session 15, docs/kernels.md.)

With `RotShape.rate_heads` the increments arrive as their factors, a rate (B, Lp, rate_heads,
S) and the heads' dt (B, H, Lp): each program forms rate * dt of its head, and the backward
returns d rate of its head (XLA sums the heads sharing a rate) and d dt.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._compat import SQ, compiler_params, dot, dot_precision, sincos

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class RotShape:
    B: int
    nc: int
    C: int
    R: int
    G: int
    H: int
    N: int
    S: int
    cdt: str
    interpret: bool
    warps: int = 4
    angle_mode: str = "tf32x3"  # the prefix-sum dots on the GPU: 'tf32x3' or 'ieee' (exact FMA)
    # 0: `inc` holds every head's increments (B, Lp, H, S). Else `inc` is the rate (B, Lp,
    # rate_heads, S) and a (B, H, Lp) dt is passed too: the kernels form rate * dt per head
    # (no (B, Lp, H, S) tensor written by XLA) and the backward returns d rate per head and d dt
    rate_heads: int = 0
    fast_trig: bool = False  # cos / sin by `_compat.sincos(fast=True)` (TritonBlocks.fast_trig)
    # the rate arrives before its activation (`SSMInputs.angle_pre`, any dtype): pi tanh of it
    # is formed in registers, and the backward returns the gradient of the pre-activation
    rate_tanh: bool = False

    @property
    def hg(self) -> int:
        return self.H // self.G

    @property
    def rate_group(self) -> int:  # heads per rate head
        return self.H // self.rate_heads if self.rate_heads else 1

    @property
    def angle_prec(self):  # float32 prefix sums: exact in interpret mode
        return dot_precision(f32, self.interpret, self.angle_mode)

    @property
    def params(self):
        return None if self.interpret else compiler_params(self.warps, 1)


def to_pair_blocks(u, S: int):
    """(..., N) in the model's channel order (pairs (2i, 2i + 1)) -> pairs in columns (i, S + i);
    the N - 2S plain channels stay at the end. A reshape and a transpose (no gather, so its
    transpose under autodiff is no scatter)."""
    lead = u.shape[:-1]
    rot = jnp.swapaxes(u[..., :2 * S].reshape(lead + (S, 2)), -1, -2).reshape(lead + (2 * S,))
    return jnp.concatenate([rot, u[..., 2 * S:]], axis=-1)


def from_pair_blocks(u, S: int):
    """Inverse of `to_pair_blocks`."""
    lead = u.shape[:-1]
    rot = jnp.swapaxes(u[..., :2 * S].reshape(lead + (2, S)), -1, -2).reshape(lead + (2 * S,))
    return jnp.concatenate([rot, u[..., 2 * S:]], axis=-1)


def _prefix_matrix(seg):
    """The (C, C) 0/1 matrix [s <= t, same segment] of one chunk's segmented prefix sums."""
    t = jax.lax.broadcasted_iota(jnp.int32, (seg.shape[0], seg.shape[0]), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (seg.shape[0], seg.shape[0]), 1)
    return jnp.where((t >= s) & (seg[:, None] == seg[None, :]), 1.0, 0.0)


def _theta(inc, a_in, seg, prec):
    """Cumulative angles (C, S) of one chunk and one head."""
    tri = _prefix_matrix(seg)
    th = dot(tri, inc, precision=prec)
    return th + jnp.where(seg == 0, 1.0, 0.0)[:, None] * a_in[None, :], tri


def _biased(ref, bias, off, w, cdt):
    """Columns [off, off + w) of a (C, N) ref plus the bias, rounded like `per_head` does."""
    return (ref[:, pl.ds(off, w)].astype(f32) + bias[None, :]).astype(cdt).astype(f32)


def _rate(inc_ref, rate_tanh: bool):
    """The chunk's (C, S) increments, or with factors its rate (pi tanh of the loaded
    pre-activation with `rate_tanh`), float32."""
    return _activated(inc_ref[...], rate_tanh)


def _activated(x, rate_tanh: bool):
    x = x.astype(f32)
    return math.pi * jnp.tanh(x) if rate_tanh else x


def _increments(rate, dt_ref):
    """The chunk's (C, S) increments of this head: `_rate`'s, or the rate times the head's dt."""
    return rate if dt_ref is None else rate * dt_ref[...][:, None]


def _fwd_kernel(*refs, rs: RotShape):
    q_ref, k_ref, qb_ref, kb_ref, inc_ref, a_ref, sg_ref = refs[:7]
    dt_ref = refs[7] if rs.rate_heads else None
    qr_ref, kr_ref = refs[-2:]
    _rotate_rows(((q_ref, qb_ref, qr_ref), (k_ref, kb_ref, kr_ref)), inc_ref, a_ref, sg_ref,
                 dt_ref, rs)


def _fwd_k_kernel(*refs, rs: RotShape):
    """`_fwd_kernel` for k alone (`rotate_k`)."""
    k_ref, kb_ref, inc_ref, a_ref, sg_ref = refs[:5]
    dt_ref = refs[5] if rs.rate_heads else None
    _rotate_rows(((k_ref, kb_ref, refs[-1]),), inc_ref, a_ref, sg_ref, dt_ref, rs)


def _rotate_rows(parts, inc_ref, a_ref, sg_ref, dt_ref, rs: RotShape):
    """One head and chunk: the angles, then each (group rows, bias, output) of `parts` biased,
    rounded and rotated into the head's rows."""
    S, N, cdt = rs.S, rs.N, jnp.dtype(rs.cdt)
    th, _ = _theta(_increments(_rate(inc_ref, rs.rate_tanh), dt_ref), a_ref[...], sg_ref[...],
                   rs.angle_prec)
    cos, sin = sincos(th, rs.fast_trig, rs.interpret)
    for src, b_ref, out in parts:
        a = _biased(src, b_ref[pl.ds(0, S)], 0, S, cdt)  # pair member 1 of each rotated pair
        b = _biased(src, b_ref[pl.ds(S, S)], S, S, cdt)  # pair member 2
        out[:, pl.ds(0, S)] = (a * cos - b * sin).astype(out.dtype)
        out[:, pl.ds(S, S)] = (a * sin + b * cos).astype(out.dtype)
        if N > 2 * S:
            out[:, pl.ds(2 * S, N - 2 * S)] = _biased(
                src, b_ref[pl.ds(2 * S, N - 2 * S)], 2 * S, N - 2 * S, cdt).astype(out.dtype)


def _unrotate(da, db, cos, sin):
    """R(theta)^T on a rotated pair's gradients: the gradients of the pair before rotation."""
    return da * cos + db * sin, db * cos - da * sin


def _add_angle_grad(dth, a, b, da, db, cos, sin):
    """dth plus d theta of the pair (a, b) rotated by theta, from its rotated gradients (da,
    db); summed in this order (as timed: another association took 45 more registers offline)."""
    return dth + db * (a * cos - b * sin) - da * (a * sin + b * cos)


def _bwd_kernel(*refs, rs: RotShape):
    """One head and chunk: un-rotated gradients (summed over the group's heads by XLA), the
    bias gradients' partial sums over the chunk, d(increments) (or d rate of this head and
    d dt) and d(angle carried in)."""
    q_ref, k_ref, qb_ref, kb_ref, inc_ref, a_ref, sg_ref = refs[:7]
    dt_ref = refs[7] if rs.rate_heads else None
    dqr_ref, dkr_ref, dq_ref, dk_ref, dqb_ref, dkb_ref, dinc_ref, da_ref = refs[
        8 if rs.rate_heads else 7:][:8]
    ddt_ref = refs[-1] if rs.rate_heads else None
    S, N, cdt = rs.S, rs.N, jnp.dtype(rs.cdt)
    parts = ((q_ref, qb_ref, dqr_ref, dq_ref, dqb_ref), (k_ref, kb_ref, dkr_ref, dk_ref, dkb_ref))
    seg = sg_ref[...]
    # the rate is loaded again for d rate below: holding it took 10-30 more registers and no
    # fewer instructions (offline, sm_90a), and the default path's IR stays as timed
    th, tri = _theta(_increments(_rate(inc_ref, rs.rate_tanh), dt_ref), a_ref[...], seg,
                     rs.angle_prec)
    cos, sin = sincos(th, rs.fast_trig, rs.interpret)
    dth = jnp.zeros(th.shape, f32)
    for src, b_ref, d_ref, out, db_ref in parts:
        a = _biased(src, b_ref[pl.ds(0, S)], 0, S, cdt)
        b = _biased(src, b_ref[pl.ds(S, S)], S, S, cdt)
        da = d_ref[:, pl.ds(0, S)].astype(f32)
        db = d_ref[:, pl.ds(S, S)].astype(f32)
        dth = _add_angle_grad(dth, a, b, da, db, cos, sin)
        for off, du in zip((0, S), _unrotate(da, db, cos, sin), strict=True):
            out[:, pl.ds(off, S)] = du.astype(out.dtype)
            db_ref[pl.ds(off, S)] = jnp.sum(du, axis=0)
    if N > 2 * S:  # the unrotated channels pass through
        for _, _, d_ref, out, db_ref in parts:
            dp = d_ref[:, pl.ds(2 * S, N - 2 * S)]
            out[:, pl.ds(2 * S, N - 2 * S)] = dp.astype(out.dtype)
            db_ref[pl.ds(2 * S, N - 2 * S)] = jnp.sum(dp.astype(f32), axis=0)
    # tri^T dth, a transposed-lhs dot. Timed on the H200 against the same kernel with the plain
    # channels first, with (dth^T tri)^T (no spills in an offline compile, 4.4 GB of spills and
    # 2.6x slower under XLA) and with the transposed matrix built directly: none was faster.
    dinc = dot(tri, dth, ta=True, precision=rs.angle_prec)
    if dt_ref is None:
        dinc_ref[...] = dinc
    else:  # inc = rate * dt: d rate (this head's share) and d dt
        drate = dinc * dt_ref[...][:, None]
        if rs.rate_tanh:  # rate = pi tanh(x): d x = d rate pi (1 - tanh^2 x)
            t = jnp.tanh(inc_ref[...].astype(f32))
            drate = drate * (math.pi * (1.0 - t * t))
        dinc_ref[...] = drate
        ddt_ref[...] = jnp.sum(dinc * _rate(inc_ref, rs.rate_tanh), axis=1)
    da_ref[...] = jnp.sum(jnp.where(seg == 0, 1.0, 0.0)[:, None] * dth, axis=0)


def _specs(rs: RotShape):
    """Input BlockSpecs of both kernels, grid (B, nc, R, H): the head's group rows, biases,
    increments, carried angle and the chunk's segment ids."""
    C, N, S, hg, rg = rs.C, rs.N, rs.S, rs.hg, rs.rate_group
    specs = [
        pl.BlockSpec((SQ, C, SQ, SQ, N), lambda b, c, r, h: (b, c, r, h // hg, 0)),
        pl.BlockSpec((SQ, C, SQ, SQ, N), lambda b, c, r, h: (b, c, r, h // hg, 0)),
        pl.BlockSpec((SQ, SQ, N), lambda b, c, r, h: (h, r, 0)),
        pl.BlockSpec((SQ, SQ, N), lambda b, c, r, h: (h, r, 0)),
        pl.BlockSpec((SQ, C, SQ, S), (lambda b, c, r, h: (b, c, h // rg, 0)) if rg > 1
                     else (lambda b, c, r, h: (b, c, h, 0))),
        pl.BlockSpec((SQ, SQ, SQ, S), lambda b, c, r, h: (b, c, h, 0)),
        pl.BlockSpec((SQ, C), lambda b, c, r, h: (b, c)),
    ]
    if rs.rate_heads:  # the head's dt, (B, H, Lp)
        specs.append(pl.BlockSpec((SQ, SQ, C), lambda b, c, r, h: (b, h, c)))
    return specs


def _head_rows(rs: RotShape):
    """BlockSpec of one head's (C, N) rows in a (B, Lp, R, H, N) array, grid (B, nc, R, H)."""
    return pl.BlockSpec((SQ, rs.C, SQ, SQ, rs.N), lambda b, c, r, h: (b, c, r, h, 0))


def _forward(rs: RotShape, q, k, qb, kb, inc, a, seg, dt):
    B, nc, C, R, H, N = rs.B, rs.nc, rs.C, rs.R, rs.H, rs.N
    out = _head_rows(rs)
    shape = jax.ShapeDtypeStruct((B, nc * C, R, H, N), jnp.dtype(rs.cdt))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, rs=rs), grid=(B, nc, R, H),
        in_specs=_specs(rs), out_specs=[out, out], out_shape=[shape, shape],
        interpret=rs.interpret, compiler_params=rs.params, name="mamba3_rotate_qk",
    )(q, k, qb, kb, inc, a, seg, *([dt] if rs.rate_heads else []))


def rotate_k(rs: RotShape, k, kb, inc, a, seg, dt=None):
    """Forward only: `rotate_qk`'s k rows without q's (an inference path whose other kernel
    rotates q itself, `TritonBlocks.mosaic_output=3`)."""
    B, nc, C, R, H, N = rs.B, rs.nc, rs.C, rs.R, rs.H, rs.N
    specs = _specs(rs)
    return pl.pallas_call(
        functools.partial(_fwd_k_kernel, rs=rs), grid=(B, nc, R, H),
        in_specs=[specs[1], specs[3]] + specs[4:], out_specs=_head_rows(rs),
        out_shape=jax.ShapeDtypeStruct((B, nc * C, R, H, N), jnp.dtype(rs.cdt)),
        interpret=rs.interpret, compiler_params=rs.params, name="mamba3_rotate_k",
    )(k, kb, inc, a, seg, *([dt] if rs.rate_heads else []))


def _backward(rs: RotShape, q, k, qb, kb, inc, a, seg, dt, dqr, dkr):
    B, nc, C, R, G, H, N, S, hg = rs.B, rs.nc, rs.C, rs.R, rs.G, rs.H, rs.N, rs.S, rs.hg
    head = _head_rows(rs)
    bias = pl.BlockSpec((SQ, SQ, SQ, SQ, N), lambda b, c, r, h: (b, c, r, h, 0))
    per_rank = R > 1  # angle gradients per rank, summed over R by XLA
    if per_rank:
        inc_spec = pl.BlockSpec((SQ, C, SQ, SQ, S), lambda b, c, r, h: (b, c, r, h, 0))
        a_spec = pl.BlockSpec((SQ, SQ, SQ, SQ, S), lambda b, c, r, h: (b, c, r, h, 0))
        shapes = [(B, nc * C, R, H, S), (B, nc, R, H, S)]
    else:
        inc_spec = pl.BlockSpec((SQ, C, SQ, S), lambda b, c, r, h: (b, c, h, 0))
        a_spec = pl.BlockSpec((SQ, SQ, SQ, S), lambda b, c, r, h: (b, c, h, 0))
        shapes = [(B, nc * C, H, S), (B, nc, H, S)]
    out_specs = [head, head, bias, bias, inc_spec, a_spec]
    out_shape = [jax.ShapeDtypeStruct(sh, f32) for sh in shapes]
    if rs.rate_heads:  # d dt per head (and rank), (B, [R,] H, Lp)
        out_specs.append(pl.BlockSpec((SQ, SQ, SQ, C), lambda b, c, r, h: (b, r, h, c))
                         if per_rank else pl.BlockSpec((SQ, SQ, C), lambda b, c, r, h: (b, h, c)))
        out_shape.append(jax.ShapeDtypeStruct((B, R, H, nc * C) if per_rank
                                              else (B, H, nc * C), f32))
    cdt = jnp.dtype(rs.cdt)
    du_q, du_k, dqb, dkb, dinc, da, *ddt = pl.pallas_call(
        functools.partial(_bwd_kernel, rs=rs), grid=(B, nc, R, H),
        in_specs=_specs(rs) + [head, head], out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((B, nc * C, R, H, N), cdt)] * 2
        + [jax.ShapeDtypeStruct((B, nc, R, H, N), f32)] * 2 + out_shape,
        interpret=rs.interpret, compiler_params=rs.params, name="mamba3_rotate_qk_bwd",
    )(q, k, qb, kb, inc, a, seg, *([dt] if rs.rate_heads else []), dqr, dkr)

    def group_sum(d):  # per-head gradient -> the B/C group's (float32 sum over its heads)
        return jnp.sum(d.reshape(B, nc * C, R, G, hg, N).astype(f32), axis=4)

    if per_rank:
        dinc, da = jnp.sum(dinc, axis=2), jnp.sum(da, axis=2)
        ddt = [jnp.sum(d, axis=1) for d in ddt]
    if rs.rate_heads:  # d rate: each rate head's share summed over the heads that read it
        dinc = jnp.sum(dinc.reshape(B, nc * C, rs.rate_heads, rs.rate_group, S), axis=3)
    return (group_sum(du_q), group_sum(du_k), jnp.sum(dqb, axis=(0, 1)),
            jnp.sum(dkb, axis=(0, 1)), dinc, da, ddt[0] if ddt else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def rotate_qk(rs: RotShape, q, k, qb, kb, inc, a, seg, dt=None):
    """q, k (B, Lp, R, G, N); qb, kb (H, R, N) f32; inc (B, Lp, H, S) f32 (or, with
    rs.rate_heads, the rate (B, Lp, rate_heads, S) f32 and dt (B, H, Lp) f32); a (B, nc, H, S)
    f32; seg (B, Lp) int32 -> rotated q, k per head (B, Lp, R, H, N) in the compute dtype."""
    return _forward(rs, q, k, qb, kb, inc, a, seg, dt)


def _rot_fwd(rs, q, k, qb, kb, inc, a, seg, dt=None):
    return _forward(rs, q, k, qb, kb, inc, a, seg, dt), (q, k, qb, kb, inc, a, seg, dt)


def _rot_bwd(rs, res, cts):
    q, k, qb, kb, inc, a, seg, dt = res
    dqr, dkr = cts
    dq, dk, dqb, dkb, dinc, da, ddt = _backward(rs, q, k, qb, kb, inc, a, seg, dt, dqr, dkr)
    dqb, dkb = (jnp.swapaxes(d, 0, 1) for d in (dqb, dkb))  # (R, H, N) -> (H, R, N)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dqb.astype(qb.dtype), dkb.astype(kb.dtype),
            dinc.astype(inc.dtype), da, None, ddt)


rotate_qk.defvjp(_rot_fwd, _rot_bwd)
