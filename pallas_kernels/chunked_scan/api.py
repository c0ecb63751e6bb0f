"""Chunked Mamba-3 SSM for prefill and training: public function and implementation registry.

`chunked_scan(inp, state, *, z, D, ...)` has `mamba3_jax.backends.mixer_core`'s contract: the
SSM inputs (q, k per B/C group plus per-head biases, or per head) and the state in, the gated
per-head output (B, L, H, P) in the input dtype and the final state out.

Split of the work:
  * XLA pre-pass (differentiable; elementwise plus two small dots): cumulative rotary angles per
    chunk (a segmented prefix-sum dot inside each chunk, a short scan over chunk totals across
    chunks), bias and rotation of q and k per head, rank lift of x, the trapezoid scale
    sc_t = gamma_t + eta_{t+1}, chunk-local cumulative log decay and segment ids, the augmented
    initial state g0 = h0 + eta_0 kv_prev. Rows are (token, rank) pairs.
  * The core (`IMPLEMENTATIONS`, e.g. `pallas_triton.ssd_core`): the SSM on those rows,
    chunk-parallel, with its own backward.
  * XLA post-pass: `gate_output` (D skip, optional RMSNorm, gate, rank sum), fused by XLA.
XLA's autodiff of the pre- and post-pass carries the core's gradients back to the inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp

from mamba3_jax.ops.mixer import gate_output
from mamba3_jax.ops.rotary import TWO_PI, rotate
from mamba3_jax.ops.ssm import SSMInputs, SSMState, lift
from pallas_kernels._compat import KernelUnsupported, batch_parallel, is_pow2
from pallas_kernels.chunked_scan import pallas_mosaic_gpu, pallas_triton
from pallas_kernels.chunked_scan.pallas_triton import CoreShape, TritonBlocks, default_blocks
from pallas_kernels.chunked_scan.pallas_triton_rotary import (
    RotShape,
    from_pair_blocks,
    rotate_k,
    rotate_qk,
    to_pair_blocks,
)

f32 = jnp.float32


def _check(cond, msg):
    if not cond:
        raise KernelUnsupported(msg)


# ----------------------------------------------------------------------------- XLA pre-pass


def _mod_scan(keep, total, angle0):
    """Angle entering each chunk: a_0 = angle0, a_{c+1} = keep_c a_c + total_c (mod 2 pi).
    keep (B, nc), total, angle0 (B, nc, H, S) / (B, H, S); an associative scan over chunks."""
    total = total.at[:, 0].add(keep[:, 0, None, None] * angle0)

    def combine(a, b):
        (k1, u1), (k2, u2) = a, b
        return k1 * k2, jnp.mod(k2[..., None, None] * u1 + u2, TWO_PI)

    _, after = jax.lax.associative_scan(combine, (keep, total), axis=1)
    return jnp.concatenate([angle0[:, None], after[:, :-1]], axis=1)


def chunk_angles(inc, seg, angle0, C: int):
    """Cumulative rotary angles theta (B, Lp, H, S) float32 from increments inc (B, Lp, H, S),
    chunk-local segment ids seg (B, Lp) (resets so far in the chunk, the reset token included)
    and the angle before the first token (B, H, S). Equal to the sequential accumulation mod
    2 pi: inside a chunk a prefix-sum dot, across chunks a scan of the chunk totals."""
    B, Lp, H, S = inc.shape
    nc = Lp // C
    sg = seg.reshape(B, nc, C)
    t = jnp.arange(C)
    tri = ((t[:, None] >= t[None, :]) & (sg[..., :, None] == sg[..., None, :])).astype(f32)
    local = jnp.einsum("bcts,bcshk->bcthk", tri, inc.reshape(B, nc, C, H, S),
                       precision=jax.lax.Precision.HIGHEST)
    keep = (sg[:, :, -1] == 0).astype(f32)  # no reset in the chunk: the angle carries through
    carry = _mod_scan(keep, local[:, :, -1], angle0.astype(f32))  # (B, nc, H, S)
    theta = local + jnp.where((sg == 0)[..., None, None], carry[:, :, None], 0.0)
    return theta.reshape(B, Lp, H, S)


_HI = jax.lax.Precision.HIGHEST


def _token_sum(inc, w):
    """sum_t w[b, n, t] inc[b, n, t, h, s] -> (B, n, H, S). inc is the increments (B, n, T, H, S)
    or their factors (rate (B, n, T, Ha, S), dt (B, n, T, H)): then a dot over t, and the
    per-head increments are never formed."""
    if not isinstance(inc, tuple):
        return jnp.sum(jnp.where(w[..., None, None] > 0, inc, 0.0), axis=2)
    rate, dt = inc
    (B, n, T, Ha, S), H = rate.shape, dt.shape[-1]
    wdt = (dt * w[..., None]).reshape(B, n, T, Ha, H // Ha)
    return jnp.einsum("bntaj,bntas->bnajs", wdt, rate, precision=_HI).reshape(B, n, H, S)


def _time_view(inc, fn):
    """fn applied to the time-major arrays of `inc` (increments, or the (rate, dt) factors)."""
    return tuple(fn(a) for a in inc) if isinstance(inc, tuple) else fn(inc)


def chunk_carry(inc, seg, angle0, C: int):
    """Angle entering every chunk (B, nc, H, S): a scan over the chunk totals (the increments of
    each chunk's last segment). inc (B, Lp, H, S) f32 or its factors (rate (B, Lp, Ha, S), dt
    (B, Lp, H)), seg (B, Lp) chunk-local segment ids."""
    B, Lp = seg.shape
    sg = seg.reshape(B, Lp // C, C)
    last = (sg == sg[:, :, -1:]).astype(f32)
    totals = _token_sum(_time_view(inc, lambda a: a.reshape(B, Lp // C, C, *a.shape[2:])), last)
    return _mod_scan((sg[:, :, -1] == 0).astype(f32), totals, angle0.astype(f32))


def theta_at(inc, seg, carry, t: int, C: int):
    """Cumulative angle (B, H, S) at token t (an XLA sum over t's chunk up to t)."""
    c0 = (t // C) * C
    sg = seg[:, c0:t + 1]
    mine = (sg == sg[:, -1:]).astype(f32)
    local = _token_sum(_time_view(inc, lambda a: a[:, None, c0:t + 1]), mine[:, None])[:, 0]
    return local + jnp.where((sg[:, -1] == 0)[:, None, None], carry[:, t // C], 0.0)


def _carried_angles(inp: SSMInputs, state: SSMState, seg, padt, C: int, L: int,
                    factored: bool = False, pre: int = 0):
    """The padded increments (B, Lp, H, S) f32 as the rotation kernels take them (factored: the
    padded rate (B, Lp, Ha, S) and dt (B, Lp, H); with `pre`, `inp.angle_pre` in its dtype in
    place of the rate), the angle entering every chunk (`chunk_carry`) and the cumulative angle
    at the last token (B, H, S)."""
    if factored:
        dt = padt(inp.angle_dt.astype(f32))
        # with pre, the float32 rate exists only for the reductions below (XLA keeps it for
        # their backward: session 17's HLO; recomputing it there instead did not pay, session 18)
        rate = (math.pi * jnp.tanh(padt(inp.angle_pre).astype(f32)) if pre
                else padt(inp.angle_rate.astype(f32)))
        inc = (rate, dt)
    else:
        inc = padt(inp.angle_inc.astype(f32))
    carry = chunk_carry(inc, seg, state.angle, C)
    theta_last = theta_at(inc, seg, carry, L - 1, C)
    return ((padt(inp.angle_pre), inc[1]) if pre else inc), carry, theta_last


def _per_head_rows(v, bias, theta, H: int, cdt):
    """q or k (B, Lp, R, G or H, N) + bias (H, R, N), rotated by theta (B, Lp, H, S), as rows
    (B, Lp R, H, N) in the compute dtype."""
    B, Lp, R, G, N = v.shape
    if G != H:
        v = jnp.repeat(v, H // G, axis=3)
    u = v.astype(f32)
    if bias is not None:
        u = (u + jnp.swapaxes(bias, 0, 1).astype(f32)).astype(v.dtype).astype(f32)
    u = rotate(u, theta[:, :, None]) if theta is not None else u
    return u.astype(cdt).reshape(B, Lp * R, H, N)


def _rows(a, R: int):
    """Per-token (B, Lp, H) -> per-row (B, H, Lp R)."""
    a = jnp.swapaxes(a, 1, 2)
    return jnp.repeat(a, R, axis=2) if R > 1 else a


def _padder(L: int, Lp: int):
    """Zero-pad axis 1 (time) from L to Lp."""
    def padt(a):
        return jnp.pad(a, [(0, 0), (0, Lp - L)] + [(0, 0)] * (a.ndim - 2)) if Lp > L else a
    return padt


def _chunk_segments(reset, padt, Lp: int, C: int):
    """Chunk-local segment ids (B, Lp): the resets so far in each chunk of C tokens, the reset
    token included."""
    B = reset.shape[0]
    return jnp.cumsum(padt(reset).reshape(B, Lp // C, C).astype(jnp.int32), axis=2).reshape(B, Lp)


def _scalars(inp: SSMInputs, state: SSMState, mimo_x, C: int, R: int, Lp: int):
    """Everything per token the core needs besides q, k, v: chunk-local segment ids (B, Lp),
    per-row (B, H, Lp R) cumulative log decay, trapezoid scale sc_t = gamma_t + eta_{t+1} (eta
    cut at segment starts) and gamma, segment ids per row, and the augmented initial state
    g0 = h0 + eta_0 kv_prev (B, H, P, N) in the model's channel order."""
    B, L, H = inp.x.shape[:3]
    padt = _padder(L, Lp)
    reset = jnp.zeros((B, L), bool) if inp.reset is None else inp.reset
    eta = jnp.where(reset[..., None], 0.0, inp.eta.astype(f32))
    scale = inp.gamma.astype(f32) + jnp.concatenate([eta[:, 1:], jnp.zeros_like(eta[:, :1])], 1)
    seg = _chunk_segments(reset, padt, Lp, C)
    cs = jnp.cumsum(padt(inp.log_decay.astype(f32)).reshape(B, Lp // C, C, H), axis=2)
    cs = _rows(cs.reshape(B, Lp, H), R)
    sc, gm = _rows(padt(scale), R), _rows(padt(inp.gamma.astype(f32)), R)
    seg_rows = jnp.repeat(seg, R, axis=1) if R > 1 else seg
    kv0 = jnp.einsum("brhp,brhn->bhpn", lift(state.x_prev, mimo_x), state.k_prev.astype(f32),
                     precision=jax.lax.Precision.HIGHEST)
    g0 = state.h.astype(f32) + eta[:, 0, :, None, None] * kv0
    return seg, cs, sc, gm, seg_rows, g0


def _pair_bias(b, H: int, R: int, N: int, S: int):
    """A per-head bias (H, R, N) in pair-block channel order, float32 (zeros if None)."""
    return jnp.zeros((H, R, N), f32) if b is None else to_pair_blocks(b.astype(f32), S)


def _rotation_chunks(inp: SSMInputs, seg, padt, Lp: int, C: int, rotary_chunk: int):
    """The rotation kernels' chunk (`TritonBlocks.rotary_chunk`; 0: the core's C) and its
    chunk-local segment ids (B, Lp)."""
    Cr = min(rotary_chunk, C) if rotary_chunk else C
    if Cr == C:
        return C, seg
    B, L = inp.x.shape[:2]
    return Cr, _chunk_segments(jnp.zeros((B, L), bool) if inp.reset is None else inp.reset,
                               padt, Lp, Cr)


def _rot_shape(B, Lp, Cr, R, G, H, N, S, cdt, *, interpret, angle_mode, fast_trig, rate_tanh,
               warps_rotary, rate_heads) -> RotShape:
    """The rotation kernels' static shape for chunks of Cr tokens."""
    return RotShape(B=B, nc=Lp // Cr, C=Cr, R=R, G=G, H=H, N=N, S=S, cdt=jnp.dtype(cdt).name,
                    interpret=interpret, angle_mode=angle_mode, fast_trig=bool(fast_trig),
                    rate_tanh=rate_tanh,
                    # a (C, N) tile: 4 warps on MIMO's 16-token chunks spilled (compile_check)
                    warps=min(warps_rotary, max(1, Cr // 8)), rate_heads=rate_heads)


def prepare_rows(inp: SSMInputs, state: SSMState, mimo_x, C: int, cdt, *, interpret: bool,
                 rotary: str = "kernel", warps_rotary: int = 4, angle_mode: str = "tf32x3",
                 rotary_chunk: int = 0, factored_angles: int = 0, fast_trig: int = 0,
                 pre_angles: int = 0):
    """The pre-pass: the core's operands, the angle at the last token, k rows, padded length and
    whether q, k and the state have their channels in `to_pair_blocks` order.
    rotary: 'kernel' (bias + rotation in `rotate_qk`) or 'xla'. rotary_chunk: tokens per
    program of the rotation kernels (0: C; else min(rotary_chunk, C)): the rotation's chunks
    are independent of the core's (their own carried angles), and smaller ones hold fewer
    registers. factored_angles (TritonBlocks'): the rotation kernels take `inp.angle_rate` and
    `inp.angle_dt` (when given) and form the per-head increments themselves; 1 SISO, 2 any R."""
    B, L, R, G, N = inp.q.shape
    H = inp.x.shape[2]
    S = inp.angle_inc.shape[-1]
    Lp = -(-L // C) * C
    padt = _padder(L, Lp)
    seg, cs, sc, gm, seg_rows, g0 = _scalars(inp, state, mimo_x, C, R, Lp)
    permuted = False
    if S and rotary == "kernel":
        Cr, seg_r = _rotation_chunks(inp, seg, padt, Lp, C, rotary_chunk)
        factored = inp.angle_rate is not None and (
            factored_angles >= 2 or (factored_angles == 1 and R == 1))
        pre = pre_angles if factored and inp.angle_pre is not None else 0
        inc, carry, theta_last = _carried_angles(inp, state, seg_r, padt, Cr, L, factored, pre)
        dt = None
        if factored:  # the rate and dt (B, H, Lp), the kernels' layout for per-head scalars
            inc, dt = inc[0], jnp.swapaxes(inc[1], 1, 2)
        rs = _rot_shape(B, Lp, Cr, R, G, H, N, S, cdt, interpret=interpret,
                        angle_mode=angle_mode, fast_trig=fast_trig, rate_tanh=bool(pre),
                        warps_rotary=warps_rotary, rate_heads=inc.shape[2] if factored else 0)
        permuted = True

        q, k = rotate_qk(rs, to_pair_blocks(padt(inp.q).astype(cdt), S),
                         to_pair_blocks(padt(inp.k).astype(cdt), S),
                         _pair_bias(inp.q_bias, H, R, N, S), _pair_bias(inp.k_bias, H, R, N, S),
                         inc, carry, seg_r, dt)
        q, k = (u.reshape(B, Lp * R, H, N) for u in (q, k))
        g0 = to_pair_blocks(g0, S)
    else:
        theta = chunk_angles(padt(inp.angle_inc.astype(f32)), seg, state.angle, C) if S else None
        theta_last = theta[:, L - 1] if S else None
        q = _per_head_rows(padt(inp.q), inp.q_bias, theta, H, cdt)
        k = _per_head_rows(padt(inp.k), inp.k_bias, theta, H, cdt)
    v = inp.x.astype(cdt) if mimo_x is None else lift(inp.x, mimo_x).astype(cdt)  # SISO: x
    v = padt(v).reshape(B, Lp * R, H, -1)
    return (q, k, v, cs, sc, gm, seg_rows, g0), theta_last, k, Lp, permuted


# ----------------------------------------------------------------------------- registry


IMPLEMENTATIONS = {"pallas_triton": pallas_triton.ssd_core}  # (CoreShape, *operands) -> y, h
# forward only, D and the gate in the output kernel: (CoreShape, *operands, z, D) -> out, _, h
GATED_FORWARD = {"pallas_triton": pallas_triton.forward}
# the core and its skip and gate under one VJP (SISO, no RMSNorm; `TritonBlocks.core_gate`):
# (CoreShape, *operands, z, D) -> float32 out (B, L, H, P), h
GATED_CORE = {"pallas_triton": pallas_triton.ssd_core_gated}


def check_supported(inp: SSMInputs, C: int, interpret: bool):
    R, G, N = inp.q.shape[2:]
    H, P = inp.x.shape[2], inp.x.shape[3]
    cdt = jnp.dtype(inp.x.dtype)
    _check(cdt in (jnp.dtype(f32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)),
           f"input dtype {cdt} (need float32, bfloat16 or float16)")
    _check(is_pow2(C) and is_pow2(R) and C * R >= 16,
           f"chunk {C} x rank {R} must be powers of two with chunk*rank >= 16")
    _check(H % G == 0 and inp.k.shape == inp.q.shape, f"{G} B/C groups must divide {H} heads")
    _check(is_pow2(N) and N >= 16, f"d_state {N} must be a power of two >= 16")
    _check(is_pow2(P) and P >= 16, f"headdim {P} must be a power of two >= 16")


@dataclasses.dataclass(frozen=True)
class _Opts:
    """Static options of one call (hashable: a nondiff argument of the custom_vjp)."""

    C: int
    interpret: bool
    blocks: TritonBlocks
    impl: str
    rotary: str
    norm_eps: float


def _prepare(o: _Opts, inp, state, mimo_x, cdt):
    """`prepare_rows` with this call's options."""
    b = o.blocks
    return prepare_rows(
        inp, state, mimo_x, o.C, cdt, interpret=o.interpret, rotary=o.rotary,
        warps_rotary=b.warps_rotary, angle_mode=b.angle_mode, rotary_chunk=b.rotary_chunk,
        factored_angles=b.factored_angles, fast_trig=b.fast_trig, pre_angles=b.pre_angles)


def _rows_path(o: _Opts, inp, state, z, D, mimo_x=None, mimo_z=None, mimo_o=None,
               norm_weight=None, gate_in_kernel: bool = False):
    """Rotated q, k rows per head (`rotate_qk`), the SSD core, the gate in XLA: the training
    path (every piece has its backward). gate_in_kernel (SISO without RMSNorm, outside
    autodiff): the core's forward kernels with D and the gate in the output kernel instead."""
    B, L, R, G, N = inp.q.shape
    H, P = inp.x.shape[2], inp.x.shape[3]
    S = inp.angle_inc.shape[-1]
    cdt = jnp.dtype(inp.x.dtype)
    ops, theta_last, k_rows, Lp, permuted = _prepare(o, inp, state, mimo_x, cdt)
    shape = CoreShape(B=B, H=H, nc=Lp // o.C, C=o.C, R=R, N=N, P=P, cdt=cdt.name,
                      interpret=o.interpret, blocks=o.blocks)
    if gate_in_kernel:
        zr = _padder(L, Lp)(z.astype(cdt))
        Dp = jnp.broadcast_to(D.astype(f32)[:, None], (H, P))
        out, _, g_last = GATED_FORWARD[o.impl](dataclasses.replace(shape, gate=True), *ops,
                                               z=zr, D=Dp)
        out = out[:, :L]
    elif o.blocks.core_gate and R == 1 and norm_weight is None and o.impl in GATED_CORE and all(
            m is None for m in (mimo_x, mimo_z, mimo_o)):
        out, g_last = GATED_CORE[o.impl](shape, *ops, z, D)
    else:
        y, g_last = IMPLEMENTATIONS[o.impl](shape, *ops)
        y = y.reshape(B, Lp, R, H, P)[:, :L]
        out = gate_output(y, inp.x, z, D, mimo_x, mimo_z, mimo_o, norm_weight, o.norm_eps)
    if permuted:  # the kernels' rows and state are in pair-block order
        g_last = from_pair_blocks(g_last, S)
        # the last k row again, in XLA: slicing the kernel's rows would add its gradient to
        # all of d k rows (a full read and write of them, 2.6% of the 180M train step)
        last = _per_head_rows(inp.k[:, L - 1:], inp.k_bias, theta_last[:, None], H, cdt)
    else:
        last = k_rows.reshape(B, Lp, R, H, N)[:, L - 1]
    return out.astype(cdt), _final_state(inp, state, theta_last, g_last, last)


def _final_state(inp, state, theta_last, g_last, k_last):
    """The state after the last token: angle, h (in the model's channel order), k and x rows."""
    return SSMState(
        angle=jnp.mod(theta_last, TWO_PI) if theta_last is not None else state.angle.astype(f32),
        h=g_last.astype(state.h.dtype),
        k_prev=k_last.astype(state.k_prev.dtype),
        x_prev=inp.x[:, -1].astype(state.x_prev.dtype))


def _mosaic_rotates(o: _Opts, inp) -> bool:
    """Whether `_rotated_in_kernels` covers this inference call (`TritonBlocks.mosaic_output=2`:
    SISO, rotated channels with factored angles, the Mosaic kernels' tiles)."""
    B, L, R, G, N = inp.q.shape
    S = inp.angle_inc.shape[-1]
    # 4 S % 128: the angle carried into a chunk (S float32) is one TMA copy, and Mosaic GPU's
    # copies move whole multiples of 128 bytes (S = 16 failed to compile on the H200)
    return bool(o.blocks.mosaic_output in (2, 3) and o.rotary == "kernel" and R == 1 and S
                and inp.angle_rate is not None and S % 32 == 0 and (N - 2 * S) % 16 == 0
                and pallas_mosaic_gpu.covers(o.C, R, N, inp.x.shape[3], inp.x.dtype))


def _rotated_in_kernels(o: _Opts, inp, state, z, D):
    """The SISO inference forward whose output kernel reads no per-head q, k rows: the Mosaic
    GPU output kernel rotates the groups' q, k itself from the angles' factors and the angle
    carried into each chunk (`pallas_mosaic_gpu.rotating_output`); XLA forms the per-token
    scalars and the carried angles. The states entering the chunks: `mosaic_output=2`, the
    Mosaic state pass, which rotates k too (no rows at all); 3, the Triton rotation kernel's
    k rows and the Triton state pass."""
    B, L, _, G, N = inp.q.shape
    H, P = inp.x.shape[2], inp.x.shape[3]
    S = inp.angle_inc.shape[-1]
    C, cdt = o.C, jnp.dtype(inp.x.dtype)
    Lp = -(-L // C) * C
    padt = _padder(L, Lp)
    seg, cs, sc, gm, seg_rows, g0 = _scalars(inp, state, None, C, 1, Lp)
    pre = o.blocks.pre_angles if inp.angle_pre is not None else 0
    inc, carry, theta_last = _carried_angles(inp, state, seg, padt, C, L, True, pre)
    rate, dt = inc[0], jnp.swapaxes(inc[1], 1, 2)

    def group(u):  # (B, Lp, G, N) pair-block order
        return to_pair_blocks(padt(u)[:, :, 0].astype(cdt), S)

    q, k = group(inp.q), group(inp.k)
    qb, kb = (_pair_bias(b, H, 1, N, S)[:, 0] for b in (inp.q_bias, inp.k_bias))
    v = padt(inp.x.astype(cdt))
    if o.blocks.mosaic_output == 3:  # k rows from the Triton rotation, the Triton state pass
        # in the rotation's own chunks (TritonBlocks.rotary_chunk), as `prepare_rows` runs it
        Cr, seg_r = _rotation_chunks(inp, seg, padt, Lp, C, o.blocks.rotary_chunk)
        rate_r, dt_r, carry_r = rate, dt, carry
        if Cr != C:
            (rate_r, dt_r), carry_r, _ = _carried_angles(inp, state, seg_r, padt, Cr, L, True,
                                                         pre)
            dt_r = jnp.swapaxes(dt_r, 1, 2)
        rs = _rot_shape(B, Lp, Cr, 1, G, H, N, S, cdt, interpret=o.interpret,
                        angle_mode=o.blocks.angle_mode, fast_trig=o.blocks.fast_trig,
                        rate_tanh=bool(pre), warps_rotary=o.blocks.warps_rotary,
                        rate_heads=rate.shape[2])
        k_rows = rotate_k(rs, k[:, :, None], kb[:, None], rate_r, carry_r, seg_r,
                          dt_r).reshape(B, Lp, H, N)
        shape = CoreShape(B=B, H=H, nc=Lp // C, C=C, R=1, N=N, P=P, cdt=cdt.name,
                          interpret=o.interpret, blocks=o.blocks)
        states, g_last = pallas_triton.state_pass(shape, k_rows, v, cs, sc, seg_rows,
                                                  to_pair_blocks(g0, S))
    else:
        states, g_last = pallas_mosaic_gpu.rotating_state_pass(
            k, kb, v, cs, sc, seg_rows, to_pair_blocks(g0, S), rate, dt, carry,
            rate_tanh=bool(pre),
            stages=o.blocks.mosaic_stages, interpret=o.interpret)
    out = pallas_mosaic_gpu.rotating_output(
        q, qb, k, kb, v, cs, sc, gm, seg_rows, states, padt(z.astype(cdt)),
        jnp.broadcast_to(D.astype(f32)[:, None], (H, P)), rate, dt, carry, rate_tanh=bool(pre),
        interpret=o.interpret)
    last = _per_head_rows(inp.k[:, L - 1:], inp.k_bias, theta_last[:, None], H, cdt)
    return out[:, :L], _final_state(inp, state, theta_last, from_pair_blocks(g_last, S), last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inference(o: _Opts, inp, state, z, D, mimo_x, mimo_z, mimo_o, norm_weight):
    """The forward when not differentiated (custom_vjp: the primal only runs outside
    differentiation; under autodiff the training path runs and its VJP is used). SISO without
    RMSNorm: D and the gate in the output kernel. MIMO: the rotation in XLA instead of the
    rotation kernel (`TritonBlocks.mimo_xla_rotation`)."""
    if inp.q.shape[2] > 1:
        return _rows_path(dataclasses.replace(o, rotary="xla"), inp, state, z, D, mimo_x,
                          mimo_z, mimo_o, norm_weight)
    if _mosaic_rotates(o, inp):
        return _rotated_in_kernels(o, inp, state, z, D)
    return _rows_path(o, inp, state, z, D, gate_in_kernel=True)


def _inference_fwd(o, *args):
    return jax.vjp(functools.partial(_rows_path, o), *args)


def _inference_bwd(o, vjp, ct):
    return vjp(ct)


_inference.defvjp(_inference_fwd, _inference_bwd)


def chunked_scan(inp: SSMInputs, state: SSMState, *, z, D, mimo_x=None, mimo_z=None,
                 mimo_o=None, norm_weight=None, chunk_size: int = 64, norm_eps: float = 1e-5,
                 interpret: bool = False, blocks: Optional[TritonBlocks] = None,
                 impl: str = "pallas_triton", rotary: str = "kernel"):
    """`backends.mixer_core`'s contract on the chunk-parallel kernels: (out (B, L, H, P) in the
    input dtype, final state). chunk_size is in tokens (rows per chunk: chunk_size * R).
    Outside autodiff, SISO without the RMSNorm applies D and the gate in the output kernel
    (`TritonBlocks.inference_gate`), and MIMO rotates q, k in XLA (`mimo_xla_rotation`)."""
    blocks = blocks or default_blocks()
    C = int(chunk_size)
    check_supported(inp, C, interpret)
    if inp.angle_rate is not None:
        B, L, H = inp.x.shape[:3]
        rate, dt = inp.angle_rate.shape, getattr(inp.angle_dt, "shape", None)
        if not (len(rate) == 4 and rate[:2] == (B, L) and rate[2] and H % rate[2] == 0
                and rate[3] == inp.angle_inc.shape[-1] and dt == (B, L, H)):
            raise ValueError(f"angle_rate {rate} / angle_dt {dt} must be (B, L, Ha, S) with Ha "
                             f"dividing H and (B, L, H) for x {inp.x.shape}")
    R, N, P = inp.q.shape[2], inp.q.shape[4], inp.x.shape[3]
    _check(blocks.bp == 0 or (is_pow2(blocks.bp) and blocks.bp >= 16 and P % blocks.bp == 0),
           f"block bp {blocks.bp} must be a power of two >= 16 dividing P = {P}")
    n = blocks.rotary_chunk
    _check(n == 0 or (is_pow2(n) and (interpret or n >= 16)),
           f"rotary_chunk {n} must be 0 or a power of two (>= 16 compiled)")
    if blocks.pre_angles not in (0, 1) or blocks.pass_unroll < 1:
        raise ValueError(f"TritonBlocks pre_angles must be 0 or 1 (got {blocks.pre_angles}) "
                         f"and pass_unroll >= 1 (got {blocks.pass_unroll})")
    S = inp.angle_inc.shape[-1]
    plain = N - 2 * S
    if not interpret and S and not (S >= 16 and is_pow2(S) and (plain == 0 or (
            is_pow2(plain) and plain >= 16))):
        rotary = "xla"  # Triton tiles need power-of-two widths >= 16: rotate in XLA instead
    if rotary not in ("kernel", "xla"):
        raise ValueError(
            f"rotary must be 'kernel' or 'xla', got {rotary!r}")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {impl!r}; have {sorted(IMPLEMENTATIONS)}")
    o = _Opts(C=C, interpret=bool(interpret), blocks=blocks, impl=impl, rotary=rotary,
              norm_eps=float(norm_eps))
    siso_plain = R == 1 and mimo_x is None and norm_weight is None
    inference = (siso_plain and blocks.inference_gate) or (
        R > 1 and S and rotary == "kernel" and blocks.mimo_xla_rotation)

    def run(inp, state, z, q_bias, k_bias, D, mimo_x, mimo_z, mimo_o, norm_weight):
        inp = inp._replace(q_bias=q_bias, k_bias=k_bias)
        if inference:
            return _inference(o, inp, state, z, D, mimo_x, mimo_z, mimo_o, norm_weight)
        return _rows_path(o, inp, state, z, D, mimo_x, mimo_z, mimo_o, norm_weight)

    # Under a mesh with batch axes XLA gathers a custom call's operands onto every device.
    # Per-device kernels (shard_map) are opt-in: XLA 0.11.2 crashed (SIGSEGV) compiling the
    # 180M train step with them on two H200s, while the trainer's per-device data-parallel
    # step (training/step.py) runs the kernels on each shard without it (docs/kernels.md).
    if os.environ.get("MAMBA3_KERNEL_SHARD_MAP") == "1":
        run = batch_parallel(run, (True, True, True) + (False,) * 7)
    return run(inp._replace(q_bias=None, k_bias=None), state, z, inp.q_bias, inp.k_bias, D,
               mimo_x, mimo_z, mimo_o, norm_weight)
