"""Chunked Mamba-3 SSM (prefill / training) as Pallas Triton kernels, forward and backward.

Semantics are those of `mamba3_jax.ops.ssm.ssm_chunked` followed by
`mamba3_jax.ops.mixer.gate_output`: with the augmented state g_t = h_t + eta_{t+1} sum_r v_t k_t^T
the recurrence is Mamba-2's with a per-key scale, scale_s = gamma_s + eta_{s+1}, and only gamma_t
on the diagonal.

Split of the work:
  * XLA pre-pass (cheap, differentiable, O(B L H)): the per-token scalars (chunk-local cumsum
    of log decay, scale, gamma, chunk-local segment ids), the augmented initial state
    g_0 = h_0 + eta_0 kv_prev, the per-head parameter table (D, mimo_*, norm weight, biases).
  * Forward kernel, grid (B, H, P / block_p): runs the chunks of one sequence in order carrying
    the state (block_p x N, float32) and the rotary angle (S,) in registers; per chunk it forms
    the cumulative angles (segmented prefix sums of the increments), adds the per-head bias to
    the group's B/C vectors and rotates them in registers (adjacent pairs of the first 2S
    channels), and fuses the intra-chunk matmuls, the state readout, D, the optional per-head
    RMSNorm, the gate silu(z * mimo_z) and the rank sum with mimo_o. Under autodiff it also
    writes the state and angle entering each chunk (the residuals of the backward).
  * Backward (`BlockSizes.bwd`), per chunk: recompute the chunk's forward from the saved state,
    back-propagate the gate epilogue and the SSM, un-rotate dq/dk and emit d(angle increments)
    (`_chunk_backward`, shared by both modes). 'fused': one kernel, grid (B, H), the chunks in
    reverse order carrying dG (P x N) and d(angle). 'split': a light sequential kernel, grid
    (B, H, P / block_p), carries dG only (gate/norm backward, rotation of q, one dot per chunk)
    and stores the dG leaving every chunk; then a kernel with one program per chunk, grid
    (B, H, chunks), does the rest; XLA adds the angle gradient carried across chunks (a tiny
    scan). Per-token scalar gradients go back to XLA, whose autodiff of the pre-pass turns them
    into d(log_decay), d(gamma), d(eta) and d(initial state); per-head d(q), d(k) are summed over
    a group's heads there.

The kernels are wired with `jax.custom_vjp`. `interpret=True` runs the same kernels on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba3_jax.backends import Unsupported
from mamba3_jax.ops.rotary import TWO_PI, rotate
from mamba3_jax.ops.ssm import SSMInputs, SSMState, lift
from pallas_kernels._compat import (
    SQ,
    compiler_params,
    dot,
    dot_precision,
    is_pow2,
    pair_sum,
    swap_pairs,
)

f32 = jnp.float32


class KernelUnsupported(Unsupported):
    """Shape/config the kernels cannot run: 'auto' falls back to the XLA chunked form."""


BWD_MODES = ("fused", "split")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tunable launch parameters of the chunked kernels.

    chunk: tokens per chunk (None: the caller's chunk_size); rows per chunk are chunk * R.
    block_p: head-dim block of the forward kernel and of the split backward's sequential pass
        (None: all of P; needed with the RMSNorm).
    bwd: backward implementation. 'fused': one kernel, grid (B, H), walks the chunks in reverse
        carrying dG. 'split': a light sequential kernel for dG at the chunk boundaries (grid
        (B, H, P / block_p)), then one program per chunk for every gradient (grid (B, H, chunks)).
    num_warps_bwd / num_stages_bwd: the fused backward; *_bwd_state / *_bwd_chunk: the split one.
    """

    chunk: Optional[int] = None
    block_p: Optional[int] = None
    num_warps_fwd: int = 8
    num_stages_fwd: int = 2
    num_warps_bwd: int = 8
    num_stages_bwd: int = 1
    f32_mode: str = "tf32x3"  # dots on float32 inputs on the GPU: 'ieee', 'tf32x3' or 'tf32'
    bwd: str = "fused"
    num_warps_bwd_state: int = 4
    num_stages_bwd_state: int = 1
    num_warps_bwd_chunk: int = 8
    num_stages_bwd_chunk: int = 1

    def __post_init__(self):
        if self.bwd not in BWD_MODES:
            raise ValueError(f"BlockSizes.bwd must be one of {BWD_MODES}, got {self.bwd!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: a nondiff argument of the custom_vjp)."""

    B: int
    Lp: int
    R: int
    H: int
    G: int  # B/C groups: q, k are read per group, the per-head bias is added in the kernel
    N: int
    P: int
    S: int
    C: int
    bp: int
    has_norm: bool
    eps: float
    cdt: str
    interpret: bool
    blocks: BlockSizes

    @property
    def nc(self) -> int:
        return self.Lp // self.C

    @property
    def CR(self) -> int:
        return self.C * self.R

    @property
    def parts(self):
        """Channel ranges of N: (offset, width, rotated). Rotated pairs are adjacent."""
        out = []
        if self.S:
            out.append((0, 2 * self.S, True))
        if self.N - 2 * self.S:
            out.append((2 * self.S, self.N - 2 * self.S, False))
        return tuple(out)

    @property
    def prec(self):
        return dot_precision(self.cdt, self.interpret, self.blocks.f32_mode)

    @property
    def angle_prec(self):
        """Angle prefix sums are float32 dots with a 0/1 matrix: exact in interpret mode, three
        tf32 products (~1e-6 relative) on the GPU."""
        return dot_precision(jnp.float32, self.interpret, "tf32x3" if self.blocks.f32_mode ==
                             "tf32" else self.blocks.f32_mode)

    @property
    def hg(self) -> int:  # heads per group
        return self.H // self.G

    @property
    def K(self) -> int:  # rows of the per-head parameter table
        return 2 + 3 * self.R


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


# ----------------------------------------------------------------------------- in-kernel helpers


def _to_rows(a, R):
    """(C, ...) per token -> (C*R, ...) per row (row = (token, rank)). R = 1 returns a as it is:
    a (C, 1, P) view would give Triton extra layouts (and conversions, and copies in registers)
    for every tile."""
    if R == 1:
        return a
    C, rest = a.shape[0], a.shape[1:]
    return jnp.broadcast_to(a[:, None], (C, R) + rest).reshape((C * R,) + rest)


def _rank_rows(m, C):
    """(R, P) per rank -> (C*R, P) per row ((1, P), broadcasting over rows, for R = 1)."""
    R, P = m.shape
    if R == 1:
        return m
    return jnp.broadcast_to(m[None], (C, R, P)).reshape(C * R, P)


def _rank_sum(a, R):
    """(C*R, ...) per row -> (C, ...) per token: sum over the ranks."""
    if R == 1:
        return a
    return jnp.sum(a.reshape((a.shape[0] // R, R) + a.shape[1:]), axis=1)


def _token_sum(a, R):
    """(C*R, P) per row -> (R, P) per rank: sum over the tokens."""
    if R == 1:
        return jnp.sum(a, axis=0, keepdims=True)
    return jnp.sum(a.reshape(a.shape[0] // R, R, a.shape[1]), axis=0)


def _last(v):
    """Last element of a 1-D tensor, as a scalar (a masked sum: no scalar indexing in Triton)."""
    idx = jnp.arange(v.shape[0])
    return jnp.sum(jnp.where(idx == v.shape[0] - 1, v, jnp.zeros_like(v)))


def _last_row(m):
    """Last row of a 2-D tensor (masked sum over rows)."""
    idx = jnp.arange(m.shape[0])
    return jnp.sum(jnp.where((idx == m.shape[0] - 1)[:, None], m, jnp.zeros_like(m)), axis=0)


def _prefix_matrix(seg):
    """The 0/1 matrix T[t, s] = [s <= t, same segment] (C, C) of segmented prefix sums."""
    ti = jnp.arange(seg.shape[0])
    return ((ti[:, None] >= ti[None, :]) & (seg[:, None] == seg[None, :])).astype(f32)


def _angles(inc_ref, t0, A, seg, st: _Static):
    """Cumulative rotary angles (C, S) of one chunk: segmented prefix sums of the increments (a
    dot with `_prefix_matrix`) plus the angle A (S,) carried into the chunk on the rows before
    the chunk's first segment start."""
    inc = inc_ref[pl.ds(t0, st.C), :].astype(f32)
    th = dot(_prefix_matrix(seg), inc, precision=st.angle_prec)
    return th + jnp.where(seg == 0, 1.0, 0.0)[:, None] * A[None, :]


def _rot_tables(th, st: _Static):
    """cos and signed sin (C*R, 2S) for the rotated channel pairs of one chunk; th (C, S)."""
    C, S, R = st.C, st.S, st.R
    c = jnp.broadcast_to(jnp.cos(th)[:, :, None], (C, S, 2)).reshape(C, 2 * S)
    sgn = jnp.where(jnp.arange(2) == 0, -1.0, 1.0).astype(f32)
    s = (jnp.sin(th)[:, :, None] * sgn[None, None, :]).reshape(C, 2 * S)
    if R > 1:
        c = jnp.broadcast_to(c[:, None, :], (C, R, 2 * S)).reshape(C * R, 2 * S)
        s = jnp.broadcast_to(s[:, None, :], (C, R, 2 * S)).reshape(C * R, 2 * S)
    return c, s


def _load_rows(ref, bias_ref, which, t0, off, w, st: _Static):
    """(C, R, N)-laid ref of one group -> biased rows (C*R, w) float32 of channels [off, off + w).

    The per-head bias (R, N) is added in float32 and the sum rounded to the input dtype, as
    `mamba3_jax.ops.ssm.per_head` does."""
    if st.R == 1:  # 2-D, see `_to_rows`
        u = ref[pl.ds(t0, st.C), 0, pl.ds(off, w)]
        b = bias_ref[which, 0, pl.ds(off, w)].astype(f32)
        return (u.astype(f32) + b[None, :]).astype(ref.dtype).astype(f32)
    u = ref[pl.ds(t0, st.C), :, pl.ds(off, w)]
    b = bias_ref[which, :, pl.ds(off, w)].astype(f32)  # (R, w)
    u = (u.astype(f32) + b[None, :, :]).astype(ref.dtype)
    return u.reshape(st.CR, w).astype(f32)


def _store_rows(ref, t0, off, w, rows, st: _Static):
    """Rows (C*R, w) into channels [off, off + w) of a (C, R, N)-laid ref."""
    if st.R == 1:
        ref[pl.ds(t0, st.C), 0, pl.ds(off, w)] = rows.astype(ref.dtype)
    else:
        ref[pl.ds(t0, st.C), :, pl.ds(off, w)] = rows.reshape(st.C, st.R, w).astype(ref.dtype)


def _rotate_parts(ref, bias_ref, which, t0, tabs, st: _Static):
    """Rotated rows per channel part (float32), plus the raw rows (needed by the backward)."""
    rot, raw = [], []
    for off, w, rotated in st.parts:
        u = _load_rows(ref, bias_ref, which, t0, off, w, st)
        raw.append(u)
        if rotated:
            c, s = tabs
            u = u * c + swap_pairs(u) * s
        rot.append(u)
    return rot, raw


def _masks(cs_r, seg_r, sc_r, gm_r, st: _Static, with_parts: bool = False):
    """Intra-chunk weights over rows (row = (token, rank)):
    W[t, s] = exp(cs_t - cs_s) scale_s for s < t in the same segment, gamma_t for s == t, else 0.
    With `with_parts` also the strict decay matrix and the diagonal indicator (backward)."""
    CR, R = st.CR, st.R
    ti = jnp.arange(CR) // R
    strict = (ti[:, None] > ti[None, :]) & (seg_r[:, None] == seg_r[None, :])
    diag = ti[:, None] == ti[None, :]
    decay = jnp.exp(jnp.where(strict, cs_r[:, None] - cs_r[None, :], -jnp.inf))
    W = jnp.where(diag, gm_r[:, None], decay * sc_r[None, :])
    if with_parts:
        return W, decay, diag
    return W


def _params(prm_ref, st: _Static):
    """Per-head parameter table rows: D (bp,), mx, mz, mo (R, bp), norm weight (bp,)."""
    R = st.R
    D = prm_ref[0, :].astype(f32)
    mx = prm_ref[pl.ds(1, R), :].astype(f32)
    mz = prm_ref[pl.ds(1 + R, R), :].astype(f32)
    mo = prm_ref[pl.ds(1 + 2 * R, R), :].astype(f32)
    nw = prm_ref[1 + 3 * R, :].astype(f32)
    return D, mx, mz, mo, nw


def _sigmoid(u):
    return 1.0 / (1.0 + jnp.exp(-u))


def _decays(cs, seg, st: _Static):
    """Decay factors of one chunk from its chunk-local log-decay cumsum and segment ids (C,):
    a_in (rows) exp(cs_t) before the chunk's first reset (readout of the state entering it),
    e_end (rows) exp(cs_last - cs_t) in its last segment (into the state leaving it), and the
    scalar dec = exp(cs_last) without a reset in the chunk (state entering -> state leaving)."""
    cs_r, seg_r = _to_rows(cs, st.R), _to_rows(seg, st.R)
    cs_last, seg_last = _last(cs), _last(seg)
    a_in = jnp.where(seg_r == 0, jnp.exp(cs_r), 0.0)
    e_end = jnp.where(seg_r == seg_last, jnp.exp(cs_last - cs_r), 0.0)
    dec = jnp.where(seg_last == 0, jnp.exp(cs_last), 0.0)
    return a_in, e_end, dec


def _gate(z_ref, t0, mz, st: _Static):
    """The gate of one chunk per row: z (C, bp) float32, zr = z * mimo_z (C*R, bp), sigmoid(zr)
    and silu(zr)."""
    zf = z_ref[pl.ds(t0, st.C), :].astype(f32)
    zr = _to_rows(zf, st.R) * _rank_rows(mz, st.C)
    sgz = _sigmoid(zr)
    return zf, zr, sgz, zr * sgz


def _norm(u, nw, st: _Static):
    """Optional per-head RMSNorm over P of the pre-gate output u (C*R, P): (w, xhat, rstd);
    without the norm w = u."""
    if not st.has_norm:
        return u, None, None
    rstd = jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + st.eps)
    xhat = u * rstd
    return xhat * nw[None, :], xhat, rstd


def _norm_bwd(dw, xhat, rstd, nw, st: _Static):
    """d(u) from d(w) through the optional RMSNorm (identity without it)."""
    if not st.has_norm:
        return dw
    dxh = dw * nw[None, :]
    return rstd * (dxh - xhat * jnp.mean(dxh * xhat, axis=-1, keepdims=True))


def _store_params(ref, grads, R):
    """Per-head parameter gradients (dD, dmx, dmz, dmo, dnw) into a (2 + 3R, P) table ref."""
    dD, dmx, dmz, dmo, dnw = grads
    ref[0, :] = dD
    ref[pl.ds(1, R), :] = dmx
    ref[pl.ds(1 + R, R), :] = dmz
    ref[pl.ds(1 + 2 * R, R), :] = dmo
    ref[1 + 3 * R, :] = dnw


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(q_ref, k_ref, qkb_ref, x_ref, z_ref, inc_ref, a0_ref, cs_ref, sc_ref, gm_ref,
                sg_ref, g0_ref, prm_ref, y_ref, gl_ref, al_ref, *res_refs, st: _Static):
    """res_refs (under autodiff): the state and the angle entering every chunk, and for the
    split backward with the RMSNorm also the pre-norm output u per token."""
    C, R, CR = st.C, st.R, st.CR
    cdt = jnp.dtype(st.cdt)
    prec = st.prec
    D, mx, mz, mo, nw = _params(prm_ref, st)
    parts = st.parts

    def body(c, carry):
        g, A = carry
        t0 = c * C
        cs = cs_ref[pl.ds(t0, C)]
        sc = sc_ref[pl.ds(t0, C)]
        gm = gm_ref[pl.ds(t0, C)]
        seg = sg_ref[pl.ds(t0, C)]
        tabs = None
        if st.S:
            th = _angles(inc_ref, t0, A, seg, st)
            if res_refs:
                res_refs[1][c, :] = A
            A = jnp.mod(_last_row(th), TWO_PI)
            tabs = _rot_tables(th, st)
        qc = [u.astype(cdt) for u in _rotate_parts(q_ref, qkb_ref, 0, t0, tabs, st)[0]]
        kc = [u.astype(cdt) for u in _rotate_parts(k_ref, qkb_ref, 1, t0, tabs, st)[0]]
        v = _to_rows(x_ref[pl.ds(t0, C), :].astype(f32), R) * _rank_rows(mx, C)  # lifted x
        vc = v.astype(cdt)
        cs_r, sc_r, gm_r, seg_r = (_to_rows(a, R) for a in (cs, sc, gm, seg))
        a_in, e_end, dec = _decays(cs, seg, st)

        Wm = _masks(cs_r, seg_r, sc_r, gm_r, st)
        scores = sum(dot(a, b, tb=True, precision=prec) for a, b in zip(qc, kc, strict=True))
        y = dot((scores * Wm).astype(cdt), vc, precision=prec)  # (CR, bp)
        y_in = sum(dot(a, gp.astype(cdt), tb=True, precision=prec)
                   for a, gp in zip(qc, g, strict=True))
        y = y + a_in[:, None] * y_in

        # epilogue: + D x^(r), optional RMSNorm over P, * silu(z mimo_z), rank sum with mimo_o
        u = y + D[None, :] * v  # (CR, bp)
        if len(res_refs) > 2:
            res_refs[2][pl.ds(t0 * R, CR), :] = u
        w = _norm(u, nw, st)[0]
        sz = _gate(z_ref, t0, mz, st)[3]
        y_ref[pl.ds(t0, C), :] = _rank_sum(w * sz * _rank_rows(mo, C), R).astype(y_ref.dtype)

        if res_refs:
            for (off, w_, _), gp in zip(parts, g, strict=True):
                res_refs[0][c, :, pl.ds(off, w_)] = gp

        # state passing: g <- decay(chunk) g + sum_s decay(s -> end) scale_s v_s k_s^T
        to_end = e_end * sc_r
        new = []
        for gp, kp in zip(g, kc, strict=True):
            kw = (kp.astype(f32) * to_end[:, None]).astype(cdt)
            new.append(dec * gp + dot(vc, kw, ta=True, precision=prec))
        return tuple(new), A

    g = tuple(g0_ref[:, pl.ds(off, w)].astype(f32) for off, w, _ in parts)
    A = a0_ref[...].astype(f32)
    g, A = jax.lax.fori_loop(0, st.nc, body, (g, A))
    for (off, w, _), gp in zip(parts, g, strict=True):
        gl_ref[:, pl.ds(off, w)] = gp
    al_ref[...] = A


def _saves_u(st: _Static) -> bool:
    """The split backward's sequential pass needs the pre-norm output u for the RMSNorm's
    backward; the forward saves it rather than that pass recomputing the chunk."""
    return st.has_norm and st.blocks.bwd == "split"


def _forward(st: _Static, q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm, save_states: bool):
    B, Lp, R, H, N, P, bp, hg = st.B, st.Lp, st.R, st.H, st.N, st.P, st.bp, st.hg
    nP = P // bp
    grid = (B, H, nP)
    Sk = inc.shape[-1]
    in_specs = [
        pl.BlockSpec((SQ, Lp, R, SQ, N), lambda b, h, p: (b, 0, 0, h // hg, 0)),  # q (group)
        pl.BlockSpec((SQ, Lp, R, SQ, N), lambda b, h, p: (b, 0, 0, h // hg, 0)),  # k (group)
        pl.BlockSpec((SQ, 2, R, N), lambda b, h, p: (h, 0, 0, 0)),  # q, k biases of the head
        pl.BlockSpec((SQ, Lp, SQ, bp), lambda b, h, p: (b, 0, h, p)),  # x
        pl.BlockSpec((SQ, Lp, SQ, bp), lambda b, h, p: (b, 0, h, p)),  # z
        pl.BlockSpec((SQ, Lp, SQ, Sk), lambda b, h, p: (b, 0, h, 0)),  # angle increments
        pl.BlockSpec((SQ, SQ, Sk), lambda b, h, p: (b, h, 0)),  # angle carried in
        pl.BlockSpec((SQ, SQ, Lp), lambda b, h, p: (b, h, 0)),  # cs
        pl.BlockSpec((SQ, SQ, Lp), lambda b, h, p: (b, h, 0)),  # scale
        pl.BlockSpec((SQ, SQ, Lp), lambda b, h, p: (b, h, 0)),  # gamma
        pl.BlockSpec((SQ, Lp), lambda b, h, p: (b, 0)),  # chunk-local segment ids
        pl.BlockSpec((SQ, SQ, bp, N), lambda b, h, p: (b, h, p, 0)),  # g0
        pl.BlockSpec((SQ, st.K, bp), lambda b, h, p: (h, 0, p)),  # parameter table
    ]
    out_shape = [jax.ShapeDtypeStruct((B, Lp, H, P), f32),
                 jax.ShapeDtypeStruct((B, H, P, N), f32),
                 jax.ShapeDtypeStruct((B, H, Sk), f32)]
    out_specs = [pl.BlockSpec((SQ, Lp, SQ, bp), lambda b, h, p: (b, 0, h, p)),
                 pl.BlockSpec((SQ, SQ, bp, N), lambda b, h, p: (b, h, p, 0)),
                 pl.BlockSpec((SQ, SQ, Sk), lambda b, h, p: (b, h, 0))]
    if save_states:  # residuals of the backward: state and angle entering every chunk
        out_shape += [jax.ShapeDtypeStruct((B, H, st.nc, P, N), f32),
                      jax.ShapeDtypeStruct((B, H, st.nc, Sk), f32)]
        out_specs += [pl.BlockSpec((SQ, SQ, st.nc, bp, N), lambda b, h, p: (b, h, 0, p, 0)),
                      pl.BlockSpec((SQ, SQ, st.nc, Sk), lambda b, h, p: (b, h, 0, 0))]
        if _saves_u(st):
            out_shape.append(jax.ShapeDtypeStruct((B, Lp * R, H, P), f32))  # rows
            out_specs.append(pl.BlockSpec((SQ, Lp * R, SQ, bp), lambda b, h, p: (b, 0, h, p)))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=st.interpret,
        compiler_params=None if st.interpret else compiler_params(
            st.blocks.num_warps_fwd, st.blocks.num_stages_fwd),
        name="mamba3_chunked_fwd",
    )(q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm)


# ----------------------------------------------------------------------------- backward: one chunk


class _ChunkRefs(NamedTuple):
    """The refs one chunk of the backward reads and writes. Per-token refs are indexed from the
    token offset t0, per-chunk refs (states, angs) by the chunk index c: the whole sequence in
    the fused kernel, one chunk (t0 = c = 0) in the split backward's per-chunk kernel."""

    q: Any
    k: Any
    qkb: Any
    x: Any
    z: Any
    inc: Any
    cs: Any
    sc: Any
    gm: Any
    sg: Any
    states: Any
    angs: Any
    dy: Any
    dq: Any
    dk: Any
    dx: Any
    dz: Any
    dinc: Any
    dcs: Any
    dsc: Any
    dgm: Any


def _chunk_backward(r: _ChunkRefs, t0, c, dG, dA, prm, st: _Static, carry_state: bool):
    """Backward of one chunk, given dG(j) (the state gradient leaving the chunk, channel part j,
    float32: a carried value in the fused kernel, a load in the split one) and dA (the angle
    gradient leaving it; None: added later, by XLA).

    Recomputes the chunk's forward from the state entering it, back-propagates the epilogue and
    the SSM and writes the per-token gradients (dq, dk, dx, dz, d angle increments, d cs,
    d scale, d gamma). Returns (the state gradient entering the chunk if carry_state else None,
    the angle gradient entering it, the chunk's parameter gradients (dD, dmx, dmz, dmo, dnw)).

    Register pressure: what is cheap to recompute (masks, rotation tables, the prefix matrix) is
    recomputed where used, and the saved state and dG are re-read where used, rather than kept
    live across the chunk."""
    C, R, P, S = st.C, st.R, st.P, st.S
    cdt = jnp.dtype(st.cdt)
    prec = st.prec
    D, mx, mz, mo, nw = prm
    parts = st.parts
    idx = jnp.arange(C)
    cs = r.cs[pl.ds(t0, C)]
    sc = r.sc[pl.ds(t0, C)]
    gm = r.gm[pl.ds(t0, C)]
    seg = r.sg[pl.ds(t0, C)]
    th = _angles(r.inc, t0, r.angs[c, :], seg, st) if S else None
    tabs = _rot_tables(th, st) if S else None
    # only the bf16 (input-dtype) rotated rows stay live; raw rows are re-read at the end
    qc = [u.astype(cdt) for u in _rotate_parts(r.q, r.qkb, 0, t0, tabs, st)[0]]
    kc = [u.astype(cdt) for u in _rotate_parts(r.k, r.qkb, 1, t0, tabs, st)[0]]
    v = _to_rows(r.x[pl.ds(t0, C), :].astype(f32), R) * _rank_rows(mx, C)
    vc = v.astype(cdt)
    cs_r, sc_r, gm_r, seg_r = (_to_rows(a, R) for a in (cs, sc, gm, seg))
    a_in, e_end, dec = _decays(cs, seg, st)
    to_end = e_end * sc_r

    def state_in(j):  # the state entering the chunk, channel part j, float32
        off, w, _ = parts[j]
        return r.states[c, :, pl.ds(off, w)]

    # ---- recompute the chunk's forward
    scores = sum(dot(a, b, tb=True, precision=prec) for a, b in zip(qc, kc, strict=True))
    SMc = (scores * _masks(cs_r, seg_r, sc_r, gm_r, st)).astype(cdt)
    y_in = sum(dot(qc[j], state_in(j).astype(cdt), tb=True, precision=prec)
               for j in range(len(parts)))
    y = dot(SMc, vc, precision=prec) + a_in[:, None] * y_in
    u = y + D[None, :] * v

    # ---- epilogue backward (rows)
    dout = _to_rows(r.dy[pl.ds(t0, C), :].astype(f32), R)
    zf, zr, sgz, sz = _gate(r.z, t0, mz, st)
    w, xhat, rstd = _norm(u, nw, st)
    mo_r = _rank_rows(mo, C)
    dmo = _token_sum(dout * w * sz, R)
    dzr = dout * mo_r * w * (sgz * (1.0 + zr * (1.0 - sgz)))
    r.dz[pl.ds(t0, C), :] = _rank_sum(dzr * _rank_rows(mz, C), R).astype(r.dz.dtype)
    dmz = _token_sum(dzr * _to_rows(zf, R), R)
    dw = dout * mo_r * sz
    dnw = jnp.sum(dw * xhat, axis=0) if st.has_norm else jnp.zeros((P,), f32)
    du = _norm_bwd(dw, xhat, rstd, nw, st)
    dD = jnp.sum(du * v, axis=0)
    dYf = du
    dYc = dYf.astype(cdt)
    dcs_r = jnp.sum(dYf * y_in, axis=1) * a_in  # readout of the carried state

    # ---- x (through v = x * mimo_x, the state update and the D term); first, so that the
    # masked scores, du and x die before the (CR, CR) gradient tiles are formed
    dv = dot(SMc, dYc, ta=True, precision=prec) + to_end[:, None] * sum(
        dot(kc[j], dG(j).astype(cdt), tb=True, precision=prec) for j in range(len(parts)))
    dv = dv + D[None, :] * du
    r.dx[pl.ds(t0, C), :] = _rank_sum(dv * _rank_rows(mx, C), R).astype(r.dx.dtype)
    dmx = _token_sum(dv * _to_rows(r.x[pl.ds(t0, C), :].astype(f32), R), R)

    # ---- intra-chunk weights: gradients of the masked scores and of W's scalars
    Wm, decay, diag = _masks(cs_r, seg_r, sc_r, gm_r, st, with_parts=True)
    dSM = dot(dYc, vc, tb=True, precision=prec)  # (CR, CR)
    dMm = dSM * scores
    dSc = (dSM * Wm).astype(cdt)
    E = dMm * decay
    dgm_r = jnp.sum(jnp.where(diag, dMm, 0.0), axis=1)
    dsc_r = jnp.sum(E, axis=0)
    dcs_r = dcs_r + jnp.sum(E * sc_r[None, :], axis=1) - dsc_r * sc_r

    # ---- q, k per channel part (un-rotated, d(theta)), and the state gradient; one
    # (rows, part) float32 gradient tile live at a time
    dte, ddec, dth, new_dG = 0.0, 0.0, 0.0, []
    dYa = (dYf * a_in[:, None]).astype(cdt) if carry_state else None

    def unrotate(d, ref, which, off, w, tabs):
        """Pull d(rotated rows) back through the rotation: (d(raw rows), d(theta) (C, S))."""
        cz, sn = tabs
        sgn = jnp.where(jnp.arange(2) == 0, -1.0, 1.0).astype(f32)
        sgn = jnp.broadcast_to(sgn[None, :], (S, 2)).reshape(2 * S)[None, :]
        raw = _load_rows(ref, r.qkb, which, t0, off, w, st)
        contrib = d * (swap_pairs(raw) * cz - raw * sn) * sgn
        dtheta = pair_sum(_rank_sum(contrib, R))
        return d * cz + swap_pairs(d * sn), dtheta

    for j, (off, w, rotated) in enumerate(parts):
        tabs = _rot_tables(th, st) if rotated else None  # recomputed: not live since the start
        dqj = (a_in[:, None] * dot(dYc, state_in(j).astype(cdt), precision=prec)
               + dot(dSc, kc[j], precision=prec))
        if rotated:
            dqj, dt_ = unrotate(dqj, r.q, 0, off, w, tabs)
            dth = dth + dt_
        _store_rows(r.dq, t0, off, w, dqj, st)
        VdG = dot(vc, dG(j).astype(cdt), precision=prec)  # (CR, w)
        dte = dte + jnp.sum(VdG * kc[j].astype(f32), axis=1)
        dkj = dot(dSc, qc[j], ta=True, precision=prec) + to_end[:, None] * VdG
        if rotated:
            dkj, dt_ = unrotate(dkj, r.k, 1, off, w, tabs)
            dth = dth + dt_
        _store_rows(r.dk, t0, off, w, dkj, st)
        ddec = ddec + jnp.sum(dG(j) * state_in(j))
        if carry_state:
            new_dG.append(dec * dG(j) + dot(dYa, qc[j], ta=True, precision=prec))

    # ---- per-token scalars
    tt = dte * to_end
    dsc_r = dsc_r + dte * e_end
    dcs_r = dcs_r - tt
    dcs_last = jnp.sum(tt) + ddec * dec
    r.dcs[pl.ds(t0, C)] = _rank_sum(dcs_r, R) + jnp.where(idx == C - 1, dcs_last, 0.0)
    r.dsc[pl.ds(t0, C)] = _rank_sum(dsc_r, R)
    r.dgm[pl.ds(t0, C)] = _rank_sum(dgm_r, R)
    if S:  # angles: the carried-out angle is the last row's; prefix sums transpose
        if dA is not None:
            dth = dth + jnp.where((idx == C - 1)[:, None], dA[None, :], 0.0)
        r.dinc[pl.ds(t0, C), :] = dot(_prefix_matrix(seg), dth, ta=True, precision=st.angle_prec)
        dA = jnp.sum(jnp.where((seg == 0)[:, None], dth, 0.0), axis=0)
    return (tuple(new_dG) if carry_state else None), dA, (dD, dmx, dmz, dmo, dnw)


def _finish_qk(st: _Static, dq, dk, q, qkb):
    """Per-head d(biased q), d(biased k) -> d(group q), d(group k) and d(biases) (H, 2, R, N)."""
    B, Lp, R, N, hg = st.B, st.Lp, st.R, st.N, st.hg

    def to_groups(d):
        dg = jnp.sum(d.reshape(B, Lp, R, st.G, hg, N).astype(f32), axis=4).astype(q.dtype)
        db = jnp.swapaxes(jnp.sum(d.astype(f32), axis=(0, 1)), 0, 1)
        return dg, db

    dq, dqb = to_groups(dq)
    dk, dkb = to_groups(dk)
    return dq, dk, jnp.stack([dqb, dkb], axis=1).astype(qkb.dtype)


# ----------------------------------------------------------------------------- fused backward


def _bwd_kernel(q_ref, k_ref, qkb_ref, x_ref, z_ref, inc_ref, cs_ref, sc_ref, gm_ref, sg_ref,
                prm_ref, st_ref, ang_ref, dy_ref, dgl_ref, dal_ref,
                dq_ref, dk_ref, dx_ref, dz_ref, dinc_ref, da0_ref, dcs_ref, dsc_ref, dgm_ref,
                dg0_ref, dprm_ref, *, st: _Static):
    refs = _ChunkRefs(q_ref, k_ref, qkb_ref, x_ref, z_ref, inc_ref, cs_ref, sc_ref, gm_ref,
                      sg_ref, st_ref, ang_ref, dy_ref, dq_ref, dk_ref, dx_ref, dz_ref, dinc_ref,
                      dcs_ref, dsc_ref, dgm_ref)
    prm = _params(prm_ref, st)
    P, R = st.P, st.R

    def body(i, carry):
        dG_out, dA, acc = carry
        c = st.nc - 1 - i
        dG_in, dA, grads = _chunk_backward(refs, c * st.C, c, lambda j: dG_out[j], dA, prm, st,
                                           carry_state=True)
        return dG_in, dA, tuple(a + g for a, g in zip(acc, grads, strict=True))

    dG = tuple(dgl_ref[:, pl.ds(off, w)].astype(f32) for off, w, _ in st.parts)
    dA = dal_ref[...].astype(f32)
    zP, zRP = jnp.zeros((P,), f32), jnp.zeros((R, P), f32)
    dG, dA, grads = jax.lax.fori_loop(0, st.nc, body, (dG, dA, (zP, zRP, zRP, zRP, zP)))
    for (off, w, _), d in zip(st.parts, dG, strict=True):
        dg0_ref[:, pl.ds(off, w)] = d
    da0_ref[...] = dA
    _store_params(dprm_ref, grads, R)


def _backward(st: _Static, q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs, dy, dgl, dal):
    B, Lp, R, H, N, P, hg = st.B, st.Lp, st.R, st.H, st.N, st.P, st.hg
    Sk = inc.shape[-1]
    cdt = jnp.dtype(st.cdt)
    gspec = pl.BlockSpec((SQ, Lp, R, SQ, N), lambda b, h: (b, 0, 0, h // hg, 0))
    qspec = pl.BlockSpec((SQ, Lp, R, SQ, N), lambda b, h: (b, 0, 0, h, 0))
    xspec = pl.BlockSpec((SQ, Lp, SQ, P), lambda b, h: (b, 0, h, 0))
    thspec = pl.BlockSpec((SQ, Lp, SQ, Sk), lambda b, h: (b, 0, h, 0))
    tspec = pl.BlockSpec((SQ, SQ, Lp), lambda b, h: (b, h, 0))
    hspec = pl.BlockSpec((SQ, SQ, P, N), lambda b, h: (b, h, 0, 0))
    aspec = pl.BlockSpec((SQ, SQ, Sk), lambda b, h: (b, h, 0))
    pspec = pl.BlockSpec((SQ, SQ, st.K, P), lambda b, h: (b, h, 0, 0))
    in_specs = [gspec, gspec, pl.BlockSpec((SQ, 2, R, N), lambda b, h: (h, 0, 0, 0)),
                xspec, xspec, thspec, tspec, tspec, tspec,
                pl.BlockSpec((SQ, Lp), lambda b, h: (b, 0)),
                pl.BlockSpec((SQ, st.K, P), lambda b, h: (h, 0, 0)),
                pl.BlockSpec((SQ, SQ, st.nc, P, N), lambda b, h: (b, h, 0, 0, 0)),
                pl.BlockSpec((SQ, SQ, st.nc, Sk), lambda b, h: (b, h, 0, 0)),
                xspec, hspec, aspec]
    head_shape = (B, Lp, R, H, N)  # d(q), d(k) per head: summed over a group's heads in XLA
    out_shape = [jax.ShapeDtypeStruct(head_shape, cdt), jax.ShapeDtypeStruct(head_shape, cdt),
                 jax.ShapeDtypeStruct(x.shape, cdt), jax.ShapeDtypeStruct(z.shape, cdt),
                 jax.ShapeDtypeStruct(inc.shape, f32), jax.ShapeDtypeStruct((B, H, Sk), f32),
                 jax.ShapeDtypeStruct(cs.shape, f32), jax.ShapeDtypeStruct(sc.shape, f32),
                 jax.ShapeDtypeStruct(gm.shape, f32),
                 jax.ShapeDtypeStruct((B, H, P, N), f32),
                 jax.ShapeDtypeStruct((B, H, st.K, P), f32)]
    out_specs = [qspec, qspec, xspec, xspec, thspec, aspec, tspec, tspec, tspec, hspec, pspec]
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        grid=(B, H),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=st.interpret,
        compiler_params=None if st.interpret else compiler_params(
            st.blocks.num_warps_bwd, st.blocks.num_stages_bwd),
        name="mamba3_chunked_bwd",
    )(q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs, dy, dgl, dal)
    dq, dk, dx, dz, dinc, da0, dcs, dsc, dgm, dg0, dprm = outs
    if not st.S:
        dinc, da0 = jnp.zeros_like(inc), jnp.zeros((B, H, Sk), f32)
    dq, dk, dqkb = _finish_qk(st, dq, dk, q, qkb)
    return dq, dk, dqkb, dx, dz, dinc, da0, dcs, dsc, dgm, dg0, jnp.sum(dprm, axis=0)


# ----------------------------------------------------------------------------- split backward


def _bwd_state_kernel(q_ref, qkb_ref, z_ref, inc_ref, cs_ref, sg_ref, prm_ref, ang_ref, dy_ref,
                      *refs, st: _Static):
    """Sequential pass of the split backward, grid (B, H, P / block_p): walks the chunks in
    reverse carrying dG and stores the dG leaving every chunk. Per chunk only the gate/norm
    backward (d y_ssm), the rotation of q and one (block_p x rows) x (rows x N) dot:
    dG_in = dec dG_out + (a_in dY)^T q."""
    u_ref = refs[0] if _saves_u(st) else None
    dgl_ref, dgs_ref, dg0_ref = refs[-3:]
    C, R, CR = st.C, st.R, st.CR
    cdt = jnp.dtype(st.cdt)
    _, _, mz, mo, nw = _params(prm_ref, st)

    def body(i, dG):
        c = st.nc - 1 - i
        t0 = c * C
        cs = cs_ref[pl.ds(t0, C)]
        seg = sg_ref[pl.ds(t0, C)]
        tabs = None
        if st.S:
            tabs = _rot_tables(_angles(inc_ref, t0, ang_ref[c, :], seg, st), st)
        qc = [u.astype(cdt) for u in _rotate_parts(q_ref, qkb_ref, 0, t0, tabs, st)[0]]
        a_in, _, dec = _decays(cs, seg, st)
        dout = _to_rows(dy_ref[pl.ds(t0, C), :].astype(f32), R)
        dw = dout * _rank_rows(mo, C) * _gate(z_ref, t0, mz, st)[3]
        if st.has_norm:
            _, xhat, rstd = _norm(u_ref[pl.ds(t0 * R, CR), :], nw, st)
            dw = _norm_bwd(dw, xhat, rstd, nw, st)
        dYa = (dw * a_in[:, None]).astype(cdt)
        new = []
        for (off, w, _), d, qp in zip(st.parts, dG, qc, strict=True):
            dgs_ref[c, :, pl.ds(off, w)] = d.astype(dgs_ref.dtype)
            new.append(dec * d + dot(dYa, qp, ta=True, precision=st.prec))
        return tuple(new)

    dG = tuple(dgl_ref[:, pl.ds(off, w)].astype(f32) for off, w, _ in st.parts)
    dG = jax.lax.fori_loop(0, st.nc, body, dG)
    for (off, w, _), d in zip(st.parts, dG, strict=True):
        dg0_ref[:, pl.ds(off, w)] = d


def _bwd_chunk_kernel(q_ref, k_ref, qkb_ref, x_ref, z_ref, inc_ref, cs_ref, sc_ref, gm_ref,
                      sg_ref, prm_ref, st_ref, ang_ref, dy_ref, dgs_ref,
                      dq_ref, dk_ref, dx_ref, dz_ref, dinc_ref, dain_ref, dcs_ref, dsc_ref,
                      dgm_ref, dprm_ref, *, st: _Static):
    """Parallel pass of the split backward, grid (B, H, chunks): one chunk per program, given the
    state entering it and the dG leaving it; the angle gradient from later chunks is left to
    XLA (`_carry_angle_grads`)."""
    refs = _ChunkRefs(q_ref, k_ref, qkb_ref, x_ref, z_ref, inc_ref, cs_ref, sc_ref, gm_ref,
                      sg_ref, st_ref, ang_ref, dy_ref, dq_ref, dk_ref, dx_ref, dz_ref, dinc_ref,
                      dcs_ref, dsc_ref, dgm_ref)
    def dG(j):  # loaded where used: a tile that is not kept live
        off, w, _ = st.parts[j]
        return dgs_ref[0, :, pl.ds(off, w)].astype(f32)

    _, dA, grads = _chunk_backward(refs, 0, 0, dG, None, _params(prm_ref, st), st,
                                   carry_state=False)
    if st.S:
        dain_ref[0, :] = dA
    _store_params(dprm_ref, grads, st.R)


def _carry_angle_grads(st: _Static, dinc, dain, sg, dal):
    """Cross-chunk part of the angle gradient (split backward, XLA, O(B L H S) elementwise).

    dain[c] is chunk c's own gradient of the angle entering it. With m_c = [no reset in chunk
    c], the full one is dA_c = dain_c + m_c dA_{c+1} (dA_nc = d final angle): a reverse linear
    recurrence over the chunks (an associative scan on (B, H, chunks, S)). Chunk c's last
    segment then gets dA_{c+1} on every increment (its angles all feed the angle carried out).
    Returns (d increments, d initial angle)."""
    B, nc, C = st.B, st.nc, st.C
    seg = sg.reshape(B, nc, C)
    seg_last = seg[:, :, -1]
    keep = jnp.broadcast_to((seg_last == 0)[:, None, :, None].astype(f32), dain.shape)
    m = jnp.concatenate([keep, jnp.zeros_like(dal)[:, :, None]], axis=2)
    a = jnp.concatenate([dain, dal[:, :, None]], axis=2)  # the final angle as chunk nc

    def compose(later, earlier):  # dA = a_e + m_e (a_l + m_l Z) for what lies beyond, Z
        return later[0] * earlier[0], earlier[1] + earlier[0] * later[1]

    dA = jax.lax.associative_scan(compose, (m, a), reverse=True, axis=2)[1]  # (B, H, nc+1, S)
    into_last = jnp.where((seg == seg_last[:, :, None])[:, :, :, None, None],
                          jnp.transpose(dA[:, :, 1:], (0, 2, 1, 3))[:, :, None], 0.0)
    return dinc + into_last.reshape(dinc.shape), dA[:, :, 0]


def _backward_split(st: _Static, q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs, u,
                    dy, dgl, dal):
    B, Lp, R, H, N, P, hg, C, nc, bp = (st.B, st.Lp, st.R, st.H, st.N, st.P, st.hg, st.C,
                                         st.nc, st.bp)
    Sk = inc.shape[-1]
    cdt = jnp.dtype(st.cdt)

    # sequential pass: dG leaving every chunk (stored in the MMA operand dtype, as it is used)
    in_specs = [
        pl.BlockSpec((SQ, Lp, R, SQ, N), lambda b, h, p: (b, 0, 0, h // hg, 0)),  # q (group)
        pl.BlockSpec((SQ, 2, R, N), lambda b, h, p: (h, 0, 0, 0)),  # biases
        pl.BlockSpec((SQ, Lp, SQ, bp), lambda b, h, p: (b, 0, h, p)),  # z
        pl.BlockSpec((SQ, Lp, SQ, Sk), lambda b, h, p: (b, 0, h, 0)),  # angle increments
        pl.BlockSpec((SQ, SQ, Lp), lambda b, h, p: (b, h, 0)),  # cs
        pl.BlockSpec((SQ, Lp), lambda b, h, p: (b, 0)),  # segment ids
        pl.BlockSpec((SQ, st.K, bp), lambda b, h, p: (h, 0, p)),  # parameter table
        pl.BlockSpec((SQ, SQ, nc, Sk), lambda b, h, p: (b, h, 0, 0)),  # angles entering chunks
        pl.BlockSpec((SQ, Lp, SQ, bp), lambda b, h, p: (b, 0, h, p)),  # dy
    ]
    args = [q, qkb, z, inc, cs, sg, prm, angs, dy]
    if _saves_u(st):
        in_specs.append(pl.BlockSpec((SQ, Lp * R, SQ, bp), lambda b, h, p: (b, 0, h, p)))
        args.append(u)
    in_specs.append(pl.BlockSpec((SQ, SQ, bp, N), lambda b, h, p: (b, h, p, 0)))  # d final h
    args.append(dgl)
    dgs, dg0 = pl.pallas_call(
        functools.partial(_bwd_state_kernel, st=st),
        grid=(B, H, P // bp),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((SQ, SQ, nc, bp, N), lambda b, h, p: (b, h, 0, p, 0)),
                   pl.BlockSpec((SQ, SQ, bp, N), lambda b, h, p: (b, h, p, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, nc, P, N), cdt),
                   jax.ShapeDtypeStruct((B, H, P, N), f32)],
        interpret=st.interpret,
        compiler_params=None if st.interpret else compiler_params(
            st.blocks.num_warps_bwd_state, st.blocks.num_stages_bwd_state),
        name="mamba3_chunked_bwd_state",
    )(*args)

    # parallel pass: one program per chunk
    gspec = pl.BlockSpec((SQ, C, R, SQ, N), lambda b, h, c: (b, c, 0, h // hg, 0))
    qspec = pl.BlockSpec((SQ, C, R, SQ, N), lambda b, h, c: (b, c, 0, h, 0))
    xspec = pl.BlockSpec((SQ, C, SQ, P), lambda b, h, c: (b, c, h, 0))
    thspec = pl.BlockSpec((SQ, C, SQ, Sk), lambda b, h, c: (b, c, h, 0))
    tspec = pl.BlockSpec((SQ, SQ, C), lambda b, h, c: (b, h, c))
    hspec = pl.BlockSpec((SQ, SQ, 1, P, N), lambda b, h, c: (b, h, c, 0, 0))
    aspec = pl.BlockSpec((SQ, SQ, 1, Sk), lambda b, h, c: (b, h, c, 0))
    in_specs = [gspec, gspec, pl.BlockSpec((SQ, 2, R, N), lambda b, h, c: (h, 0, 0, 0)),
                xspec, xspec, thspec, tspec, tspec, tspec,
                pl.BlockSpec((SQ, C), lambda b, h, c: (b, c)),
                pl.BlockSpec((SQ, st.K, P), lambda b, h, c: (h, 0, 0)),
                hspec, aspec, xspec, hspec]
    head_shape = (B, Lp, R, H, N)
    out_shape = [jax.ShapeDtypeStruct(head_shape, cdt), jax.ShapeDtypeStruct(head_shape, cdt),
                 jax.ShapeDtypeStruct(x.shape, cdt), jax.ShapeDtypeStruct(z.shape, cdt),
                 jax.ShapeDtypeStruct(inc.shape, f32), jax.ShapeDtypeStruct((B, H, nc, Sk), f32),
                 jax.ShapeDtypeStruct(cs.shape, f32), jax.ShapeDtypeStruct(sc.shape, f32),
                 jax.ShapeDtypeStruct(gm.shape, f32),
                 jax.ShapeDtypeStruct((B, H, nc, st.K, P), f32)]
    out_specs = [qspec, qspec, xspec, xspec, thspec, aspec, tspec, tspec, tspec,
                 pl.BlockSpec((SQ, SQ, SQ, st.K, P), lambda b, h, c: (b, h, c, 0, 0))]
    outs = pl.pallas_call(
        functools.partial(_bwd_chunk_kernel, st=st),
        grid=(B, H, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=st.interpret,
        compiler_params=None if st.interpret else compiler_params(
            st.blocks.num_warps_bwd_chunk, st.blocks.num_stages_bwd_chunk),
        name="mamba3_chunked_bwd_chunk",
    )(q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs, dy, dgs)
    dq, dk, dx, dz, dinc, dain, dcs, dsc, dgm, dprm = outs
    if st.S:
        dinc, da0 = _carry_angle_grads(st, dinc, dain, sg, dal)
    else:
        dinc, da0 = jnp.zeros_like(inc), jnp.zeros((B, H, Sk), f32)
    dq, dk, dqkb = _finish_qk(st, dq, dk, q, qkb)
    return dq, dk, dqkb, dx, dz, dinc, da0, dcs, dsc, dgm, dg0, jnp.sum(dprm, axis=(0, 2))


# ----------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st: _Static, q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm):
    y, gl, al = _forward(st, q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm, save_states=False)
    return y, gl, al


def _core_fwd(st, q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm):
    y, gl, al, states, angs, *u = _forward(st, q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm,
                                           save_states=True)
    u = u[0] if u else None
    return (y, gl, al), (q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs, u)


def _core_bwd(st, res, cts):
    q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs, u = res
    dy, dgl, dal = cts
    common = (st, q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs)
    if st.blocks.bwd == "split":
        grads = _backward_split(*common, u, dy, dgl, dal)
    else:
        grads = _backward(*common, dy, dgl, dal)
    dq, dk, dqkb, dx, dz, dinc, da0, dcs, dsc, dgm, dg0, dprm = grads
    return dq, dk, dqkb, dx, dz, dinc, da0, dcs, dsc, dgm, None, dg0, dprm


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- public entry


def _check(cond, msg):
    if not cond:
        raise KernelUnsupported(msg)


def chunked_core(inp: SSMInputs, state: SSMState, *, z, D, mimo_x=None, mimo_z=None, mimo_o=None,
                 norm_weight=None, chunk_size: int = 64, norm_eps: float = 1e-5,
                 interpret: bool = False, blocks: Optional[BlockSizes] = None):
    """`backends.mixer_core`'s contract on the Pallas kernels: (out (B, L, H, P) f32, state).

    q, k may be per head (B, L, R, H, N) or per B/C group (B, L, R, G, N) with the per-head
    biases in inp.q_bias / inp.k_bias (H, R, N): the kernels add the bias themselves, so a
    group's vectors are read once per head from memory shared by the group's heads."""
    blocks = blocks or BlockSizes()
    B, L, R, G, N = inp.q.shape
    H, P = inp.x.shape[2], inp.x.shape[3]
    S = inp.angle_inc.shape[-1]
    C = int(blocks.chunk or chunk_size)
    cdt = jnp.dtype(inp.x.dtype)
    _check(cdt in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)),
           f"input dtype {cdt} (need float32, bfloat16 or float16)")
    _check(is_pow2(C) and is_pow2(R) and C * R >= 16,
           f"chunk {C} x rank {R} must be powers of two with chunk*rank >= 16")
    _check(H % G == 0 and inp.k.shape == inp.q.shape, f"{G} B/C groups must divide {H} heads")
    _check(is_pow2(N) and N >= 16, f"d_state {N} must be a power of two >= 16")
    _check(is_pow2(P) and P >= 16, f"headdim {P} must be a power of two >= 16")
    for _off, w in ((0, 2 * S), (2 * S, N - 2 * S)):
        _check(w == 0 or (is_pow2(w) and w >= 16),
               f"rotated ({2 * S}) and plain ({N - 2 * S}) channel counts must be 0 or powers "
               f"of two >= 16")
    _check(interpret or S == 0 or S >= 16,
           f"{S} rotary angles: the GPU kernels need 0 or >= 16 (dot dimensions >= 16)")
    has_norm = norm_weight is not None
    bp = int(blocks.block_p or P)
    if has_norm:
        bp = P
    _check(is_pow2(bp) and bp >= 16 and P % bp == 0, f"block_p {bp} must divide P = {P}")
    Lp = -(-L // C) * C
    st = _Static(B=B, Lp=Lp, R=R, H=H, G=G, N=N, P=P, S=S, C=C, bp=bp, has_norm=has_norm,
                 eps=float(norm_eps), cdt=cdt.name, interpret=bool(interpret), blocks=blocks)

    q = inp.q.astype(cdt)
    k = inp.k.astype(cdt)
    x = inp.x
    z = z.astype(cdt)
    reset = jnp.zeros((B, L), bool) if inp.reset is None else inp.reset
    eta = jnp.where(reset[..., None], 0.0, inp.eta.astype(f32))
    scale = inp.gamma.astype(f32) + jnp.concatenate([eta[:, 1:], jnp.zeros_like(eta[:, :1])], 1)
    ld = inp.log_decay.astype(f32)
    gm = inp.gamma.astype(f32)

    kv0 = jnp.einsum("brhp,brhn->bhpn", lift(state.x_prev, mimo_x), state.k_prev.astype(f32),
                     precision=jax.lax.Precision.HIGHEST)
    g0 = state.h.astype(f32) + eta[:, 0, :, None, None] * kv0

    pad = Lp - L

    def padt(a):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a

    inc = inp.angle_inc.astype(f32) if S else jnp.zeros((B, L, H, 1), f32)
    a0 = state.angle.astype(f32) if S else jnp.zeros((B, H, 1), f32)
    qp, kp, xp, zp, incp = map(padt, (q, k, x, z, inc))
    ld, scale, gm, reset_p = map(padt, (ld, scale, gm, reset))
    nc = Lp // C
    cs = jnp.cumsum(ld.reshape(B, nc, C, H), axis=2).reshape(B, Lp, H)
    seg = jnp.cumsum(reset_p.reshape(B, nc, C).astype(jnp.int32), axis=2).reshape(B, Lp)

    def heads_first(a):  # (B, Lp, H) -> (B, H, Lp)
        return jnp.transpose(a, (0, 2, 1))

    prm = epilogue_params(D, mimo_x, mimo_z, mimo_o, norm_weight, H, R, P)

    biases = [getattr(inp, name, None) for name in ("q_bias", "k_bias")]
    qkb = jnp.stack([jnp.zeros((H, R, N), f32) if b is None else b.astype(f32) for b in biases],
                    axis=1)  # (H, 2, R, N)

    y, gl, al = _core(st, qp, kp, qkb, xp, zp, incp, a0, heads_first(cs), heads_first(scale),
                      heads_first(gm), seg, g0, prm)
    out = y[:, :L]
    th_last = al if S else state.angle.astype(f32)  # angle of the last token (mod 2 pi)
    k_last = jnp.repeat(k[:, -1], H // G, axis=2).astype(f32)  # (B, R, H, N), biased per head
    k_last = (k_last + jnp.swapaxes(qkb[:, 1], 0, 1)).astype(cdt)
    k_last = rotate(k_last, th_last[:, None]) if S else k_last.astype(f32)
    final = SSMState(angle=jnp.mod(th_last, TWO_PI),
                     h=gl.astype(state.h.dtype),
                     k_prev=k_last.astype(cdt).astype(state.k_prev.dtype),
                     x_prev=inp.x[:, -1].astype(state.x_prev.dtype))
    return out, final
