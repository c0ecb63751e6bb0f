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
16-token rotation chunks it is the opt-in `RotShape.head_sum`: 1024 programs there, 4 warps,
no spills offline; to time.)

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
    # backward: one program per (chunk, rank, group) walking the group's heads, the group's q,
    # k gradients (and a shared rate's) summed in registers and written once, instead of per-head
    # rows that XLA sums (`TritonBlocks.rotary_head_sum`; increments per head or one rate)
    head_sum: bool = False

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

    @property
    def heads_params(self):  # the head-sum backward: its two (C, N) float32 sums need 4 warps
        return None if self.interpret else compiler_params(max(self.warps, 4), 1)


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


def _bwd_heads_kernel(*refs, rs: RotShape):
    """`_bwd_kernel` for all heads of one group (`RotShape.head_sum`): the loop over heads
    accumulates the un-rotated q, k gradients (and, with one shared rate, d rate) in float32
    registers and writes the group's once; per head it writes the bias gradients' partial sums,
    d increments (or d dt) and d angle carried in, as `_bwd_kernel` does."""
    q_ref, k_ref, qb_ref, kb_ref, inc_ref, a_ref, sg_ref = refs[:7]
    dt_ref = refs[7] if rs.rate_heads else None
    dqr_ref, dkr_ref, dq_ref, dk_ref, dqb_ref, dkb_ref, dinc_ref, da_ref = refs[
        8 if rs.rate_heads else 7:][:8]
    ddt_ref = refs[-1] if rs.rate_heads else None
    S, N, C, cdt, prec = rs.S, rs.N, rs.C, jnp.dtype(rs.cdt), rs.angle_prec
    shared = rs.rate_heads == 1  # one rate for every head: d rate summed here
    seg = sg_ref[...]
    tri = _prefix_matrix(seg)
    first = jnp.where(seg == 0, 1.0, 0.0)[:, None]
    widths = (S, S) + ((N - 2 * S,) if N > 2 * S else ())
    offsets = (0, S, 2 * S)[:len(widths)]
    parts = ((q_ref, qb_ref, dqr_ref, dqb_ref), (k_ref, kb_ref, dkr_ref, dkb_ref))

    def head(j, acc):
        sums, drate = acc
        if rs.rate_heads:
            rate = _rate(inc_ref, rs.rate_tanh) if shared else _activated(
                inc_ref[:, j, :], rs.rate_tanh)
            inc = rate * dt_ref[j, :][:, None]
        else:
            inc = inc_ref[:, j, :].astype(f32)
        th = dot(tri, inc, precision=prec) + first * a_ref[j, :][None, :]
        cos, sin = sincos(th, rs.fast_trig, rs.interpret)
        dth = jnp.zeros(th.shape, f32)
        new = []
        for (src, b_ref, d_ref, db_ref), acc_part in zip(parts, sums, strict=True):
            a = _biased(src, b_ref[j, pl.ds(0, S)], 0, S, cdt)
            b = _biased(src, b_ref[j, pl.ds(S, S)], S, S, cdt)
            da = d_ref[:, j, pl.ds(0, S)].astype(f32)
            db = d_ref[:, j, pl.ds(S, S)].astype(f32)
            dth = _add_angle_grad(dth, a, b, da, db, cos, sin)
            dus = _unrotate(da, db, cos, sin)
            if N > 2 * S:  # the unrotated channels pass through
                dus = dus + (d_ref[:, j, pl.ds(2 * S, N - 2 * S)].astype(f32),)
            for off, w, du in zip(offsets, widths, dus, strict=True):
                db_ref[j, pl.ds(off, w)] = jnp.sum(du, axis=0)
            new.append(tuple(t + du for t, du in zip(acc_part, dus, strict=True)))
        dinc = dot(tri, dth, ta=True, precision=prec)
        if rs.rate_heads:
            ddt_ref[j, :] = jnp.sum(dinc * rate, axis=1)
            dinc = dinc * dt_ref[j, :][:, None]  # d rate, this head's share
            if shared:
                drate = drate + dinc
            else:
                if rs.rate_tanh:  # rate = pi tanh(x): d x = d rate pi (1 - tanh^2 x)
                    t = jnp.tanh(inc_ref[:, j, :].astype(f32))
                    dinc = dinc * (math.pi * (1.0 - t * t))
                dinc_ref[:, j, :] = dinc
        else:
            dinc_ref[:, j, :] = dinc
        da_ref[j, :] = jnp.sum(first * dth, axis=0)
        return tuple(new), drate

    zeros = tuple(jnp.zeros((C, w), f32) for w in widths)
    sums, drate = jax.lax.fori_loop(0, rs.hg, head, ((zeros, zeros), jnp.zeros((C, S), f32)))
    for out, part in zip((dq_ref, dk_ref), sums, strict=True):
        for off, w, u in zip(offsets, widths, part, strict=True):
            out[:, pl.ds(off, w)] = u.astype(out.dtype)
    if shared:
        if rs.rate_tanh:
            t = jnp.tanh(inc_ref[...].astype(f32))
            drate = drate * (math.pi * (1.0 - t * t))
        dinc_ref[...] = drate


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


def _backward_heads(rs: RotShape, q, k, qb, kb, inc, a, seg, dt, dqr, dkr):
    """`_backward` with one program per (chunk, rank, group) (`RotShape.head_sum`)."""
    B, nc, C, R, G, H, N, S, hg = rs.B, rs.nc, rs.C, rs.R, rs.G, rs.H, rs.N, rs.S, rs.hg
    shared = rs.rate_heads == 1

    def ranked(block, pos, index):  # per rank when R > 1 (summed over R below), as `_backward`
        if R == 1:
            return pl.BlockSpec(block, index)
        return pl.BlockSpec(block[:pos] + (SQ,) + block[pos:], lambda b, c, r, g: (
            *index(b, c, r, g)[:pos], r, *index(b, c, r, g)[pos:]))

    group_rows = pl.BlockSpec((SQ, C, SQ, SQ, N), lambda b, c, r, g: (b, c, r, g, 0))
    heads_rows = pl.BlockSpec((SQ, C, SQ, hg, N), lambda b, c, r, g: (b, c, r, g, 0))
    bias_in = pl.BlockSpec((hg, SQ, N), lambda b, c, r, g: (g, r, 0))
    bias_out = pl.BlockSpec((SQ, SQ, SQ, hg, N), lambda b, c, r, g: (b, c, r, g, 0))
    in_specs = [group_rows, group_rows, bias_in, bias_in,
                pl.BlockSpec((SQ, C, SQ, S), lambda b, c, r, g: (b, c, 0, 0)) if shared
                else pl.BlockSpec((SQ, C, hg, S), lambda b, c, r, g: (b, c, g, 0)),
                pl.BlockSpec((SQ, SQ, hg, S), lambda b, c, r, g: (b, c, g, 0)),
                pl.BlockSpec((SQ, C), lambda b, c, r, g: (b, c))]
    if rs.rate_heads:  # the heads' dt, (B, H, Lp)
        in_specs.append(pl.BlockSpec((SQ, hg, C), lambda b, c, r, g: (b, g, c)))
    per_rank = (R,) if R > 1 else ()
    out_specs = [group_rows, group_rows, bias_out, bias_out,
                 ranked((SQ, C, SQ if shared else hg, S), 2, lambda b, c, r, g: (b, c, g, 0)),
                 ranked((SQ, SQ, hg, S), 2, lambda b, c, r, g: (b, c, g, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, nc * C, R, G, N), f32)] * 2 + [
        jax.ShapeDtypeStruct((B, nc, R, H, N), f32)] * 2 + [
        jax.ShapeDtypeStruct((B, nc * C, *per_rank, G if shared else H, S), f32),
        jax.ShapeDtypeStruct((B, nc, *per_rank, H, S), f32)]
    if rs.rate_heads:  # d dt per head (and rank), (B, [R,] H, Lp)
        out_specs.append(ranked((SQ, hg, C), 1, lambda b, c, r, g: (b, g, c)))
        out_shape.append(jax.ShapeDtypeStruct((B, *per_rank, H, nc * C), f32))
    du_q, du_k, dqb, dkb, dinc, da, *ddt = pl.pallas_call(
        functools.partial(_bwd_heads_kernel, rs=rs), grid=(B, nc, R, G),
        in_specs=in_specs + [heads_rows, heads_rows], out_specs=out_specs, out_shape=out_shape,
        interpret=rs.interpret, compiler_params=rs.heads_params, name="mamba3_rotate_qk_bwd",
    )(q, k, qb, kb, inc, a, seg, *([dt] if rs.rate_heads else []), dqr, dkr)
    if R > 1:
        dinc, da = jnp.sum(dinc, axis=2), jnp.sum(da, axis=2)
        ddt = [jnp.sum(d, axis=1) for d in ddt]
    if shared:  # each group's share of d rate
        dinc = jnp.sum(dinc, axis=2, keepdims=True)
    return (du_q, du_k, jnp.sum(dqb, axis=(0, 1)), jnp.sum(dkb, axis=(0, 1)), dinc, da,
            ddt[0] if ddt else None)


def head_sum_supported(rs: RotShape) -> bool:
    """`RotShape.head_sum` covers increments per head, one rate per head and one shared rate."""
    return rs.rate_heads in (0, 1, rs.H)


def _backward(rs: RotShape, q, k, qb, kb, inc, a, seg, dt, dqr, dkr):
    if rs.head_sum and head_sum_supported(rs):
        return _backward_heads(rs, q, k, qb, kb, inc, a, seg, dt, dqr, dkr)
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
