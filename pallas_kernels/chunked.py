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
  * Backward kernel, grid (B, H): the chunks in reverse order carrying dG (P x N) and d(angle);
    recomputes the chunk's forward from the saved state, back-propagates the gate epilogue and
    the SSM, un-rotates dq/dk and emits d(angle increments); per-token scalar gradients go back
    to XLA, whose autodiff of the pre-pass turns them into d(log_decay), d(gamma), d(eta) and
    d(initial state); per-head d(q), d(k) are summed over a group's heads there.

Both kernels are wired with `jax.custom_vjp`. `interpret=True` runs the same kernels on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

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


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tunable launch parameters of the chunked kernels.

    chunk: tokens per chunk (None: the caller's chunk_size); rows per chunk are chunk * R.
    block_p: head-dim block of the forward kernel (None: all of P; needed with the RMSNorm).
    """

    chunk: Optional[int] = None
    block_p: Optional[int] = None
    num_warps_fwd: int = 8
    num_stages_fwd: int = 2
    num_warps_bwd: int = 8
    num_stages_bwd: int = 1
    f32_mode: str = "tf32x3"  # dots on float32 inputs on the GPU: 'ieee', 'tf32x3' or 'tf32'


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


def _rep(v, R):
    """(C,) per-token -> (C*R,) per-row (row = (token, rank))."""
    if R == 1:
        return v
    C = v.shape[0]
    return jnp.broadcast_to(v[:, None], (C, R)).reshape(C * R)


def _red(v, R):
    """(C*R,) per-row -> (C,) per-token sum."""
    if R == 1:
        return v
    return jnp.sum(v.reshape(v.shape[0] // R, R), axis=1)


def _last(v):
    """Last element of a 1-D tensor, as a scalar (a masked sum: no scalar indexing in Triton)."""
    idx = jnp.arange(v.shape[0])
    return jnp.sum(jnp.where(idx == v.shape[0] - 1, v, jnp.zeros_like(v)))


def _last_row(m):
    """Last row of a 2-D tensor (masked sum over rows)."""
    idx = jnp.arange(m.shape[0])
    return jnp.sum(jnp.where((idx == m.shape[0] - 1)[:, None], m, jnp.zeros_like(m)), axis=0)


def _angles(inc_ref, t0, A, seg, st: _Static):
    """Cumulative rotary angles (C, S) of one chunk: segmented prefix sums of the increments (a
    dot with the 0/1 matrix T[t, s] = [s <= t, same segment]) plus the angle A (S,) carried into
    the chunk on the rows before the chunk's first segment start. Returns (theta, T)."""
    C = st.C
    inc = inc_ref[pl.ds(t0, C), :].astype(f32)
    ti = jnp.arange(C)
    T = ((ti[:, None] >= ti[None, :]) & (seg[:, None] == seg[None, :])).astype(f32)
    th = dot(T, inc, precision=st.angle_prec)
    return th + jnp.where(seg == 0, 1.0, 0.0)[:, None] * A[None, :], T


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
    u = ref[pl.ds(t0, st.C), :, pl.ds(off, w)]
    b = bias_ref[which, :, pl.ds(off, w)].astype(f32)  # (R, w)
    u = (u.astype(f32) + b[None, :, :]).astype(ref.dtype)
    return u.reshape(st.CR, w).astype(f32)


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


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(q_ref, k_ref, qkb_ref, x_ref, z_ref, inc_ref, a0_ref, cs_ref, sc_ref, gm_ref,
                sg_ref, g0_ref, prm_ref, y_ref, gl_ref, al_ref, *st_refs, st: _Static):
    C, R, CR, bp = st.C, st.R, st.CR, st.bp
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
            th, _ = _angles(inc_ref, t0, A, seg, st)
            if st_refs:
                st_refs[1][c, :] = A
            A = jnp.mod(_last_row(th), TWO_PI)
            tabs = _rot_tables(th, st)
        qc = [u.astype(cdt) for u in _rotate_parts(q_ref, qkb_ref, 0, t0, tabs, st)[0]]
        kc = [u.astype(cdt) for u in _rotate_parts(k_ref, qkb_ref, 1, t0, tabs, st)[0]]
        xf = x_ref[pl.ds(t0, C), :].astype(f32)  # (C, bp)
        v3 = xf[:, None, :] * mx[None, :, :]  # (C, R, bp) lifted x, float32
        vc = v3.reshape(CR, bp).astype(cdt)
        cs_r, sc_r, gm_r, seg_r = (_rep(a, R) for a in (cs, sc, gm, seg))
        cs_last, seg_last = _last(cs), _last(seg)

        Wm = _masks(cs_r, seg_r, sc_r, gm_r, st)
        scores = sum(dot(a, b, tb=True, precision=prec) for a, b in zip(qc, kc, strict=True))
        y = dot((scores * Wm).astype(cdt), vc, precision=prec)  # (CR, bp)
        a_in = jnp.where(seg_r == 0, jnp.exp(cs_r), 0.0)
        y_in = sum(dot(a, gp.astype(cdt), tb=True, precision=prec)
                   for a, gp in zip(qc, g, strict=True))
        y = y + a_in[:, None] * y_in

        # epilogue: + D x^(r), optional RMSNorm over P, * silu(z mimo_z), rank sum with mimo_o
        u = y.reshape(C, R, bp) + D[None, None, :] * v3
        if st.has_norm:
            u = u * jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + st.eps)
            u = u * nw[None, None, :]
        zr = z_ref[pl.ds(t0, C), :].astype(f32)[:, None, :] * mz[None, :, :]
        u = u * zr * _sigmoid(zr)
        y_ref[pl.ds(t0, C), :] = jnp.sum(u * mo[None, :, :], axis=1).astype(y_ref.dtype)

        if st_refs:
            for (off, w, _), gp in zip(parts, g, strict=True):
                st_refs[0][c, :, pl.ds(off, w)] = gp

        # state passing: g <- decay(chunk) g + sum_s decay(s -> end) scale_s v_s k_s^T
        to_end = jnp.where(seg_r == seg_last, jnp.exp(cs_last - cs_r) * sc_r, 0.0)
        dec = jnp.where(seg_last == 0, jnp.exp(cs_last), 0.0)
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


# ----------------------------------------------------------------------------- backward kernel


def _bwd_kernel(q_ref, k_ref, qkb_ref, x_ref, z_ref, inc_ref, cs_ref, sc_ref, gm_ref, sg_ref,
                prm_ref, st_ref, ang_ref, dy_ref, dgl_ref, dal_ref,
                dq_ref, dk_ref, dx_ref, dz_ref, dinc_ref, da0_ref, dcs_ref, dsc_ref, dgm_ref,
                dg0_ref, dprm_ref, *, st: _Static):
    C, R, CR, P, S = st.C, st.R, st.CR, st.P, st.S
    cdt = jnp.dtype(st.cdt)
    prec = st.prec
    D, mx, mz, mo, nw = _params(prm_ref, st)
    parts = st.parts
    idx = jnp.arange(C)

    def body(i, carry):
        dG, dA, dD, dmx, dmz, dmo, dnw = carry
        c = st.nc - 1 - i
        t0 = c * C
        cs = cs_ref[pl.ds(t0, C)]
        sc = sc_ref[pl.ds(t0, C)]
        gm = gm_ref[pl.ds(t0, C)]
        seg = sg_ref[pl.ds(t0, C)]
        tabs = None
        if S:
            th, T = _angles(inc_ref, t0, ang_ref[c, :], seg, st)
            tabs = _rot_tables(th, st)
        # only the bf16 (input-dtype) rotated rows stay live; raw rows are re-read at the end
        qc = [u.astype(cdt) for u in _rotate_parts(q_ref, qkb_ref, 0, t0, tabs, st)[0]]
        kc = [u.astype(cdt) for u in _rotate_parts(k_ref, qkb_ref, 1, t0, tabs, st)[0]]
        xf = x_ref[pl.ds(t0, C), :].astype(f32)
        v3 = xf[:, None, :] * mx[None, :, :]
        vc = v3.reshape(CR, P).astype(cdt)
        cs_r, sc_r, gm_r, seg_r = (_rep(a, R) for a in (cs, sc, gm, seg))
        cs_last, seg_last = _last(cs), _last(seg)
        a_in = jnp.where(seg_r == 0, jnp.exp(cs_r), 0.0)
        e_end = jnp.where(seg_r == seg_last, jnp.exp(cs_last - cs_r), 0.0)
        to_end = e_end * sc_r
        dec = jnp.where(seg_last == 0, jnp.exp(cs_last), 0.0)

        # ---- recompute the chunk's forward
        Wm, decay, diag = _masks(cs_r, seg_r, sc_r, gm_r, st, with_parts=True)
        scores = sum(dot(a, b, tb=True, precision=prec) for a, b in zip(qc, kc, strict=True))
        SMc = (scores * Wm).astype(cdt)
        Gc = [st_ref[c, :, pl.ds(off, w)].astype(cdt) for off, w, _ in parts]
        y_in = sum(dot(a, g, tb=True, precision=prec) for a, g in zip(qc, Gc, strict=True))
        y = dot(SMc, vc, precision=prec) + a_in[:, None] * y_in
        u = y.reshape(C, R, P) + D[None, None, :] * v3

        # ---- epilogue backward
        dout = dy_ref[pl.ds(t0, C), :].astype(f32)[:, None, :]  # (C, 1, P)
        zf = z_ref[pl.ds(t0, C), :].astype(f32)
        zr = zf[:, None, :] * mz[None, :, :]
        sgz = _sigmoid(zr)
        sz = zr * sgz
        if st.has_norm:
            rstd = jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + st.eps)
            xhat = u * rstd
            w = xhat * nw[None, None, :]
        else:
            w = u
        dmo = dmo + jnp.sum(dout * w * sz, axis=0)
        dzr = dout * mo[None, :, :] * w * (sgz * (1.0 + zr * (1.0 - sgz)))
        dz_ref[pl.ds(t0, C), :] = jnp.sum(dzr * mz[None, :, :], axis=1).astype(dz_ref.dtype)
        dmz = dmz + jnp.sum(dzr * zf[:, None, :], axis=0)
        dw = dout * mo[None, :, :] * sz
        if st.has_norm:
            dnw = dnw + jnp.sum(jnp.sum(dw * xhat, axis=0), axis=0)
            dxh = dw * nw[None, None, :]
            du = rstd * (dxh - xhat * jnp.mean(dxh * xhat, axis=-1, keepdims=True))
        else:
            du = dw
        dD = dD + jnp.sum(jnp.sum(du * v3, axis=0), axis=0)
        dYf = du.reshape(CR, P)
        dYc = dYf.astype(cdt)
        dYa = (dYf * a_in[:, None]).astype(cdt)
        dcs_r = jnp.sum(dYf * y_in, axis=1) * a_in  # readout of the carried state

        # ---- intra-chunk weights: gradients of the masked scores and of W's scalars
        dSM = dot(dYc, vc, tb=True, precision=prec)  # (CR, CR)
        dMm = dSM * scores
        dSc = (dSM * Wm).astype(cdt)
        E = dMm * decay
        Esc = E * sc_r[None, :]
        dgm_r = jnp.sum(jnp.where(diag, dMm, 0.0), axis=1)
        dsc_r = jnp.sum(E, axis=0)
        dcs_r = dcs_r + jnp.sum(Esc, axis=1) - jnp.sum(Esc, axis=0)

        # ---- x (through v = x * mimo_x, the state update and the D term)
        dGc = [d.astype(cdt) for d in dG]
        dv = dot(SMc, dYc, ta=True, precision=prec) + to_end[:, None] * sum(
            dot(kp, d, tb=True, precision=prec) for kp, d in zip(kc, dGc, strict=True))
        dv3 = dv.reshape(C, R, P) + D[None, None, :] * du
        dx_ref[pl.ds(t0, C), :] = jnp.sum(dv3 * mx[None, :, :], axis=1).astype(dx_ref.dtype)
        dmx = dmx + jnp.sum(dv3 * xf[:, None, :], axis=0)

        # ---- q, k per channel part (un-rotated, d(theta)), and the state gradient; one
        # (rows, part) float32 gradient tile live at a time
        dte, ddec, dth, new_dG = 0.0, 0.0, 0.0, []

        def unrotate(d, ref, which, off, w):
            """Pull d(rotated rows) back through the rotation: (d(raw rows), d(theta) (C, S))."""
            cz, sn = tabs
            sgn = jnp.where(jnp.arange(2) == 0, -1.0, 1.0).astype(f32)
            sgn = jnp.broadcast_to(sgn[None, :], (S, 2)).reshape(2 * S)[None, :]
            raw = _load_rows(ref, qkb_ref, which, t0, off, w, st)
            contrib = d * (swap_pairs(raw) * cz - raw * sn) * sgn
            dtheta = pair_sum(jnp.sum(contrib.reshape(C, R, w), axis=1))
            return d * cz + swap_pairs(d * sn), dtheta

        for j, (off, w, rotated) in enumerate(parts):
            dqj = a_in[:, None] * dot(dYc, Gc[j], precision=prec) + dot(dSc, kc[j], precision=prec)
            if rotated:
                dqj, dt_ = unrotate(dqj, q_ref, 0, off, w)
                dth = dth + dt_
            dq_ref[pl.ds(t0, C), :, pl.ds(off, w)] = dqj.reshape(C, R, w).astype(dq_ref.dtype)
            VdG = dot(vc, dGc[j], precision=prec)  # (CR, w)
            dte = dte + jnp.sum(VdG * kc[j].astype(f32), axis=1)
            dkj = dot(dSc, qc[j], ta=True, precision=prec) + to_end[:, None] * VdG
            if rotated:
                dkj, dt_ = unrotate(dkj, k_ref, 1, off, w)
                dth = dth + dt_
            dk_ref[pl.ds(t0, C), :, pl.ds(off, w)] = dkj.reshape(C, R, w).astype(dk_ref.dtype)
            ddec = ddec + jnp.sum(dG[j] * st_ref[c, :, pl.ds(off, w)])
            new_dG.append(dec * dG[j] + dot(dYa, qc[j], ta=True, precision=prec))

        # ---- per-token scalars
        tt = dte * to_end
        dsc_r = dsc_r + dte * e_end
        dcs_r = dcs_r - tt
        dcs_last = jnp.sum(tt) + ddec * dec
        dcs_ref[pl.ds(t0, C)] = _red(dcs_r, R) + jnp.where(idx == C - 1, dcs_last, 0.0)
        dsc_ref[pl.ds(t0, C)] = _red(dsc_r, R)
        dgm_ref[pl.ds(t0, C)] = _red(dgm_r, R)
        if S:  # angles: the carried-out angle is the last row's; prefix sums transpose
            dth = dth + jnp.where((idx == C - 1)[:, None], dA[None, :], 0.0)
            dinc_ref[pl.ds(t0, C), :] = dot(T, dth, ta=True, precision=st.angle_prec)
            dA = jnp.sum(jnp.where((seg == 0)[:, None], dth, 0.0), axis=0)
        return tuple(new_dG), dA, dD, dmx, dmz, dmo, dnw

    dG = tuple(dgl_ref[:, pl.ds(off, w)].astype(f32) for off, w, _ in parts)
    dA = dal_ref[...].astype(f32)
    zP = jnp.zeros((P,), f32)
    zRP = jnp.zeros((R, P), f32)
    carry = (dG, dA, zP, zRP, zRP, zRP, zP)
    dG, dA, dD, dmx, dmz, dmo, dnw = jax.lax.fori_loop(0, st.nc, body, carry)
    for (off, w, _), d in zip(parts, dG, strict=True):
        dg0_ref[:, pl.ds(off, w)] = d
    da0_ref[...] = dA
    dprm_ref[0, :] = dD
    dprm_ref[pl.ds(1, R), :] = dmx
    dprm_ref[pl.ds(1 + R, R), :] = dmz
    dprm_ref[pl.ds(1 + 2 * R, R), :] = dmo
    dprm_ref[1 + 3 * R, :] = dnw


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

    def to_groups(d):  # per-head d(biased input) -> d(group input), d(bias) (H, R, N)
        dg = jnp.sum(d.reshape(B, Lp, R, st.G, hg, N).astype(f32), axis=4).astype(q.dtype)
        db = jnp.swapaxes(jnp.sum(d.astype(f32), axis=(0, 1)), 0, 1)
        return dg, db

    dq, dqb = to_groups(dq)
    dk, dkb = to_groups(dk)
    dqkb = jnp.stack([dqb, dkb], axis=1).astype(qkb.dtype)
    return dq, dk, dqkb, dx, dz, dinc, da0, dcs, dsc, dgm, dg0, jnp.sum(dprm, axis=0)


# ----------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st: _Static, q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm):
    y, gl, al = _forward(st, q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm, save_states=False)
    return y, gl, al


def _core_fwd(st, q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm):
    y, gl, al, states, angs = _forward(st, q, k, qkb, x, z, inc, a0, cs, sc, gm, sg, g0, prm,
                                       save_states=True)
    return (y, gl, al), (q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs)


def _core_bwd(st, res, cts):
    q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs = res
    dy, dgl, dal = cts
    grads = _backward(st, q, k, qkb, x, z, inc, cs, sc, gm, sg, prm, states, angs, dy, dgl, dal)
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
