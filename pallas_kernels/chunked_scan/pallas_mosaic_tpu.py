"""Chunked Mamba-3 SSM (prefill / training) as Pallas Mosaic TPU kernels, forward and backward.

Semantics: `mamba3_jax.ops.ssm.ssm_chunked` followed by `mamba3_jax.ops.mixer.gate_output`.
With the augmented state g_t = h_t + eta_{t+1} sum_r v_t k_t^T the recurrence is Mamba-2's with
a per-key scale scale_s = gamma_s + eta_{s+1} and only gamma_t on the diagonal; per chunk

    y_t = sum_{s<t, same seg} exp(cs_t - cs_s) scale_s (q_t.k_s) v_s + gamma_t (q_t.k_t) v_t
          + [no reset in chunk before t] exp(cs_t) q_t G^T
    G'  = [no reset in chunk] exp(cs_last) G
          + sum_{s in the chunk's last segment} exp(cs_last - cs_s) scale_s v_s k_s^T

Split of the work:
  * XLA pre-pass (differentiable, elementwise/transposes only): cumulative rotary angles and the
    rotation of q and k, the trapezoid scale, the rank lift v^(r) = x * mimo_x[r], the augmented
    initial state g_0 = h_0 + eta_0 kv_prev, the row layout and the packed per-row scalars
    (see `_common`).
  * Forward kernel, grid (B, H, chunks) with the chunk axis "arbitrary": the state (P, N) float32
    lives in VMEM scratch across chunks; in-chunk cumulative decay and segment ids come from a
    triangular-ones matmul; masks, intra-chunk matmuls, state readout and update, resets.
    Under autodiff it also writes the state entering every chunk (the backward's residual).
  * Backward kernel, same grid with the chunks walked in reverse by the index maps: dG (P, N)
    float32 carried in VMEM scratch; recomputes the chunk from the saved entering state; emits
    dq, dk, dv, the per-row scalar gradients (suffix sums again by a triangular matmul) and
    d(g_0). XLA's autodiff of the pre-pass maps them to the inputs (rotation pullback, mimo_x,
    eta/gamma/log decay, initial state).
  * XLA post-pass: D skip, optional per-head RMSNorm, silu(z * mimo_z) gate and the rank sum
    with mimo_o (`gate_output`; XLA fuses it into one elementwise pass over y).

Both kernels are tied together with `jax.custom_vjp`; `interpret=True` runs the very same kernels
on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba3_jax.ops.mixer import gate_output
from mamba3_jax.ops.rotary import TWO_PI, cumulative_angles, rotate
from mamba3_jax.ops.ssm import SSMInputs, SSMState, lift, per_head
from pallas_kernels._compat import BATCH_AXES, batch_parallel
from pallas_kernels.tpu._common import (
    ROW_GAMMA,
    ROW_LD,
    ROW_SCALE,
    SCALAR_ROWS,
    SQ,
    ChunkConsts,
    check,
    compiler_params,
    mm,
    pack_rows,
    parallel_and_arbitrary,
    precision_for,
    row_from_col,
    total,
    vmem_scratch,
)

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Launch parameters of the chunked TPU kernels.

    chunk: tokens per chunk, used as given (None: derived from the caller's chunk_size, below).
    min_rows: compiled (non-interpret) calls without an explicit `chunk` use at least
      ceil(min_rows / R) tokens per chunk. Rows per chunk are chunk * R: the (rows, rows) tiles
      want a multiple of 128 lanes, and the per-grid-step overhead (~0.35 us) wants enough work
      per step; the model's chunk_size (64 // R) is tuned for GPUs. Interpret mode keeps the
      caller's chunk_size (the tests use small chunks to cover many chunk boundaries).
    vmem_limit_bytes: Mosaic's scoped VMEM limit (None: the compiler default).

    A sequence shorter than one chunk runs as a single chunk of its own (rounded up to 8)
    length. Compiled for a TPU, rows per chunk must be a multiple of 8 (16 for bf16 inputs)
    unless there is only one chunk.
    """

    chunk: Optional[int] = None
    min_rows: int = 256
    vmem_limit_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: the nondiff argument of the custom_vjp)."""

    B: int
    H: int
    nc: int
    C: int
    R: int
    N: int
    P: int
    cdt: str
    interpret: object
    vmem_limit_bytes: Optional[int]

    @property
    def CR(self) -> int:
        return self.C * self.R

    @property
    def prec(self):
        return precision_for(self.cdt)


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(q_ref, k_ref, v_ref, sr_ref, g0_ref, y_ref, gl_ref, *rest, st: _Static):
    *states_ref, g_scr = rest
    c = pl.program_id(2)
    cdt = jnp.dtype(st.cdt)
    prec = st.prec

    @pl.when(c == 0)
    def _init():
        g_scr[...] = g0_ref[...].astype(f32)

    g = g_scr[...]  # (P, N) augmented state entering this chunk
    if states_ref:
        states_ref[0][...] = g

    q = q_ref[...]  # (CR, N) rotated
    k = k_ref[...]
    v = v_ref[...]  # (CR, P) lifted x
    cc = ChunkConsts(sr_ref[...], st.CR, st.R)

    scores = mm(q, k, tb=True, precision=prec)  # (CR, CR)
    y = mm((scores * cc.W).astype(cdt), v, precision=prec)  # (CR, P)
    y_in = mm(q, g.astype(cdt), tb=True, precision=prec)  # (CR, P)
    y_ref[...] = y + cc.a_c * y_in

    kw = (k.astype(f32) * cc.w_c).astype(cdt)
    g_new = cc.dec_l * g + mm(v, kw, ta=True, precision=prec)  # (P, N)
    g_scr[...] = g_new

    @pl.when(c == st.nc - 1)
    def _fin():
        gl_ref[...] = g_new


def _forward(st: _Static, q, k, v, sr, g0, save_states: bool):
    B, H, nc, CR, N, P = st.B, st.H, st.nc, st.CR, st.N, st.P
    par, arb = parallel_and_arbitrary()
    rows_n = pl.BlockSpec((SQ, SQ, CR, N), lambda b, h, c: (b, h, c, 0))
    rows_p = pl.BlockSpec((SQ, SQ, CR, P), lambda b, h, c: (b, h, c, 0))
    scal = pl.BlockSpec((SQ, SQ, SQ, SCALAR_ROWS, CR), lambda b, h, c: (b, h, c, 0, 0))
    state = pl.BlockSpec((SQ, SQ, P, N), lambda b, h, c: (b, h, 0, 0))
    out_shape = [jax.ShapeDtypeStruct((B, H, nc * CR, P), f32),
                 jax.ShapeDtypeStruct((B, H, P, N), f32)]
    out_specs = [rows_p, state]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((B, H, nc, P, N), f32))
        out_specs.append(pl.BlockSpec((SQ, SQ, SQ, P, N), lambda b, h, c: (b, h, c, 0, 0)))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(B, H, nc),
        in_specs=[rows_n, rows_n, rows_p, scal, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[vmem_scratch((P, N))],
        compiler_params=compiler_params((par, par, arb), st.vmem_limit_bytes),
        interpret=st.interpret,
        name="mamba3_tpu_chunked_fwd",
    )(q, k, v, sr, g0)


# ----------------------------------------------------------------------------- backward kernel


def _bwd_kernel(q_ref, k_ref, v_ref, sr_ref, gin_ref, dy_ref, dgl_ref,
                dq_ref, dk_ref, dv_ref, dsr_ref, dg0_ref, dg_scr, *, st: _Static):
    c = pl.program_id(2)  # step c handles chunk nc - 1 - c (see the index maps)
    cdt = jnp.dtype(st.cdt)
    prec = st.prec

    @pl.when(c == 0)
    def _init():
        dg_scr[...] = dgl_ref[...].astype(f32)

    dgn = dg_scr[...]  # (P, N) gradient wrt the state leaving this chunk
    q = q_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    g = gin_ref[...]  # (P, N) state entering this chunk (saved by the forward)
    dy = dy_ref[...].astype(f32)  # (CR, P)
    cc = ChunkConsts(sr_ref[...], st.CR, st.R)

    # recompute
    scores = mm(q, k, tb=True, precision=prec)  # (CR, CR)
    M = scores * cc.W
    y_in = mm(q, g.astype(cdt), tb=True, precision=prec)  # (CR, P)
    kf = k.astype(f32)
    kw = (kf * cc.w_c).astype(cdt)

    dyc = dy.astype(cdt)
    dgc = dgn.astype(cdt)
    # y = M v + a * (q G^T)
    dM = mm(dyc, v, tb=True, precision=prec)  # (CR, CR)
    dS = (dM * cc.W).astype(cdt)
    dW = dM * scores
    dv = mm(M.astype(cdt), dyc, ta=True, precision=prec)  # M^T dy
    dq = mm(dS, k, precision=prec) + cc.a_c * mm(dyc, g.astype(cdt), precision=prec)
    dk = mm(dS, q, ta=True, precision=prec)  # dS^T q
    da_c = jnp.sum(dy * y_in, axis=1, keepdims=True)
    # G' = dec G + v^T (k * w)
    dv = dv + mm(kw, dgc, tb=True, precision=prec)
    dkw = mm(v, dgc, precision=prec)  # (CR, N)
    dk = dk + cc.w_c * dkw
    dw_c = jnp.sum(kf * dkw, axis=1, keepdims=True)
    ddec = total(g * dgn)
    dg = cc.dec_l * dgn + mm((dy * cc.a_c).astype(cdt), q, ta=True, precision=prec)

    # per-row scalars: W = decay * scale_s + diag * gamma_t, a = exp(cs_t),
    # w = exp(cs_l - cs_s) scale_s, dec = exp(cs_l)
    dWd = dW * cc.decay
    Q = dWd * cc.sc_r
    dsc = jnp.sum(dWd, axis=0, keepdims=True) + row_from_col(dw_c * cc.ew_c, cc.eye)
    dgm = row_from_col(jnp.sum(dW * cc.diag, axis=1, keepdims=True), cc.eye)
    dcs_c = jnp.sum(Q, axis=1, keepdims=True) + da_c * cc.a_c - dw_c * cc.w_c
    dcs = row_from_col(dcs_c, cc.eye) - jnp.sum(Q, axis=0, keepdims=True)  # (1, CR)
    dcs_l = total(dw_c * cc.w_c) + ddec * cc.dec_l
    # cs = inclusive prefix sum of the log-decay row -> its gradient is a suffix sum:
    # (8, CR) @ lower, lower[i, j] = 1 if i >= j, i.e. upper^T (contract upper's columns)
    suffix = mm(pack_rows({0: dcs}, st.CR), cc.upper, tb=True, precision=jax.lax.Precision.HIGHEST)
    dld = suffix[0:1, :] + dcs_l

    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dsr_ref[...] = pack_rows({ROW_LD: dld, ROW_SCALE: dsc, ROW_GAMMA: dgm}, st.CR)
    dg_scr[...] = dg

    @pl.when(c == st.nc - 1)
    def _fin():
        dg0_ref[...] = dg


def _backward(st: _Static, q, k, v, sr, states, dy, dgl):
    B, H, nc, CR, N, P = st.B, st.H, st.nc, st.CR, st.N, st.P
    par, arb = parallel_and_arbitrary()
    cdt = jnp.dtype(st.cdt)

    def rev(b, h, c):
        return (b, h, nc - 1 - c, 0)

    def rev5(b, h, c):
        return (b, h, nc - 1 - c, 0, 0)

    rows_n = pl.BlockSpec((SQ, SQ, CR, N), rev)
    rows_p = pl.BlockSpec((SQ, SQ, CR, P), rev)
    scal = pl.BlockSpec((SQ, SQ, SQ, SCALAR_ROWS, CR), rev5)
    per_chunk_state = pl.BlockSpec((SQ, SQ, SQ, P, N), rev5)
    state = pl.BlockSpec((SQ, SQ, P, N), lambda b, h, c: (b, h, 0, 0))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        grid=(B, H, nc),
        in_specs=[rows_n, rows_n, rows_p, scal, per_chunk_state, rows_p, state],
        out_specs=[rows_n, rows_n, rows_p, scal, state],
        out_shape=[jax.ShapeDtypeStruct(q.shape, cdt), jax.ShapeDtypeStruct(k.shape, cdt),
                   jax.ShapeDtypeStruct(v.shape, cdt), jax.ShapeDtypeStruct(sr.shape, f32),
                   jax.ShapeDtypeStruct((B, H, P, N), f32)],
        scratch_shapes=[vmem_scratch((P, N))],
        compiler_params=compiler_params((par, par, arb), st.vmem_limit_bytes),
        interpret=st.interpret,
        name="mamba3_tpu_chunked_bwd",
    )(q, k, v, sr, states, dy, dgl)


# ----------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st: _Static, q, k, v, sr, g0):
    y, gl = _forward(st, q, k, v, sr, g0, save_states=False)
    return y, gl


def _core_fwd(st, q, k, v, sr, g0):
    y, gl, states = _forward(st, q, k, v, sr, g0, save_states=True)
    return (y, gl), (q, k, v, sr, states)


def _core_bwd(st, res, cts):
    q, k, v, sr, states = res
    dy, dgl = cts
    dq, dk, dv, dsr, dg0 = _backward(st, q, k, v, sr, states, dy.astype(f32), dgl.astype(f32))
    return dq, dk, dv, dsr, dg0


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- XLA pre/post pass


def _to_rows(a, nc, C):
    """(B, Lp, R, H, D) -> (B, H, Lp * R, D): row (token, rank); chunk c = rows c CR ... + CR."""
    B, Lp, R, H, D = a.shape
    return jnp.transpose(a, (0, 3, 1, 2, 4)).reshape(B, H, Lp * R, D)


def _scalar_rows(per_token, R, nc, C, rank0_only: bool):
    """(B, Lp, H) -> (B, H, nc, C*R): repeated over ranks, or only on the rank-0 row."""
    B, Lp, H = per_token.shape
    a = jnp.transpose(per_token, (0, 2, 1))[..., None]  # (B, H, Lp, 1)
    if rank0_only:
        a = jnp.concatenate([a, jnp.zeros(a.shape[:-1] + (R - 1,), a.dtype)], axis=-1)
    else:
        a = jnp.broadcast_to(a, a.shape[:-1] + (R,))
    return a.reshape(B, H, nc, C * R)


def _batch_parallel(st: _Static, batch_axes):
    """The kernel core per device on its batch rows under a mesh (`_compat.batch_parallel`:
    Mosaic kernels cannot be partitioned by XLA); without a mesh context the core itself."""
    def core(*args):
        return _core(dataclasses.replace(st, B=args[0].shape[0]), *args)

    return batch_parallel(core, (True,) * 5, batch_axes or ())


def ssm_rows_tpu(inp: SSMInputs, state: SSMState, *, mimo_x=None, chunk_size: int = 64,
                 interpret=False, blocks: Optional[BlockSizes] = None,
                 batch_axes=BATCH_AXES):
    """The SSM on the TPU kernels: (y (B, L, R, H, P) float32, final SSMState).

    Same contract as `mamba3_jax.ops.ssm.ssm_chunked`; differentiable (custom_vjp kernels).
    Group-level q/k (with q_bias/k_bias) are expanded to heads first: the rotation angle is per
    head, so the rotated vectors the kernel reads are per head anyway. Under a mesh context the
    kernels run per device on the batch shards (see `_batch_parallel`).
    """
    inp = per_head(inp)
    blocks = blocks or BlockSizes()
    B, L, R, H, N = inp.q.shape
    P = inp.x.shape[-1]
    if blocks.chunk:
        C = int(blocks.chunk)
    else:
        C = int(chunk_size)
        if not interpret:
            C = max(C, -(-blocks.min_rows // R))
        C = min(C, -(-L // 8) * 8)  # a short sequence: one chunk, little padding
    cdt = jnp.dtype(inp.q.dtype)
    check(cdt in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)),
          f"input dtype {cdt} (the TPU kernels take float32 or bfloat16)")
    check(jnp.dtype(inp.k.dtype) == cdt and jnp.dtype(inp.x.dtype) == cdt,
          "q, k and x must share one dtype")
    check(C >= 1, f"chunk {C} must be positive")
    Lp = -(-L // C) * C
    nc = Lp // C
    CR = C * R
    if not interpret:  # Mosaic block rule: second-minor dims divisible by the sublane tiling
        sub = 8 if cdt == jnp.dtype(jnp.float32) else 16
        check(CR % sub == 0 or nc == 1,
              f"chunk {C} x rank {R} = {CR} rows must be a multiple of {sub} for {cdt}")
    st = _Static(B=B, H=H, nc=nc, C=C, R=R, N=N, P=P, cdt=cdt.name, interpret=interpret,
                 vmem_limit_bytes=blocks.vmem_limit_bytes)

    hp = jax.lax.Precision.HIGHEST
    reset = jnp.zeros((B, L), bool) if inp.reset is None else inp.reset
    theta = cumulative_angles(inp.angle_inc, inp.reset, state.angle)  # (B, L, H, S)
    qr = rotate(inp.q, theta[:, :, None]).astype(cdt)
    kr = rotate(inp.k, theta[:, :, None]).astype(cdt)
    eta = jnp.where(reset[..., None], 0.0, inp.eta.astype(f32))
    gamma = inp.gamma.astype(f32)
    scale = gamma + jnp.concatenate([eta[:, 1:], jnp.zeros_like(eta[:, :1])], axis=1)
    v = lift(inp.x, mimo_x).astype(cdt)  # (B, L, R, H, P)
    kv0 = jnp.einsum("brhp,brhn->bhpn", lift(state.x_prev, mimo_x), state.k_prev.astype(f32),
                     precision=hp)
    g0 = state.h.astype(f32) + eta[:, 0, :, None, None] * kv0

    pad = Lp - L

    def padt(a):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a

    q_rows = _to_rows(padt(qr), nc, C)
    k_rows = _to_rows(padt(kr), nc, C)
    v_rows = _to_rows(padt(v), nc, C)
    reset_h = jnp.broadcast_to(reset[..., None], (B, L, H)).astype(f32)
    scal = {
        ROW_LD: _scalar_rows(padt(inp.log_decay.astype(f32)), R, nc, C, True),
        1: _scalar_rows(padt(reset_h), R, nc, C, True),
        ROW_SCALE: _scalar_rows(padt(scale), R, nc, C, False),
        ROW_GAMMA: _scalar_rows(padt(gamma), R, nc, C, False),
    }
    zero = jnp.zeros((B, H, nc, CR), f32)
    sr = jnp.stack([scal.get(i, zero) for i in range(SCALAR_ROWS)], axis=3)  # (B, H, nc, 8, CR)

    y_rows, g_last = _batch_parallel(st, batch_axes)(q_rows, k_rows, v_rows, sr, g0)
    y = y_rows.reshape(B, H, Lp, R, P)[:, :, :L]
    y = jnp.transpose(y, (0, 2, 3, 1, 4))  # (B, L, R, H, P)
    final = SSMState(angle=jnp.mod(theta[:, -1], TWO_PI), h=g_last.astype(state.h.dtype),
                     k_prev=kr[:, -1].astype(state.k_prev.dtype),
                     x_prev=inp.x[:, -1].astype(state.x_prev.dtype))
    return y, final


def chunked_core_tpu(inp: SSMInputs, state: SSMState, *, z, D, mimo_x=None, mimo_z=None,
                     mimo_o=None, norm_weight=None, chunk_size: int = 64, norm_eps: float = 1e-5,
                     interpret=False, blocks: Optional[BlockSizes] = None):
    """`mamba3_jax.backends.mixer_core`'s contract: (out (B, L, H, P) float32, final SSMState).

    The SSM runs in the TPU kernels; D, the optional RMSNorm, the gate and the rank sum run in
    XLA right after (one fused elementwise pass).
    """
    y, final = ssm_rows_tpu(inp, state, mimo_x=mimo_x, chunk_size=chunk_size,
                            interpret=interpret, blocks=blocks)
    out = gate_output(y, inp.x, z, D, mimo_x, mimo_z, mimo_o, norm_weight, norm_eps)
    return out, final
