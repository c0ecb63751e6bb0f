"""One decode step of the Mamba-3 SSM as a Pallas Mosaic TPU kernel (drop-in for `ssm_step`).

Per (batch, head) the step is a rank-2R update of the (P, N) state plus a readout:

    h <- alpha h + sum_r beta v_prev^(r) k_prev^(r)T + sum_r gamma v^(r) k^(r)T,   y^(r) = h q^(r)

XLA pre-pass (O(B H (R N + R P)), tiny next to the state): segment reset, angle update,
rotation of q and k, the rank lift, and packing into sublane-row tiles padded to 8 rows:

    V (K8, P): rows [beta v_prev^(r) ; gamma v^(r) ; alpha at (2R, 0) ; 0]
    K (K8, N): rows [k_prev^(r) ; k^(r) ; 0]
    Q (R8, N): rows [q^(r) ; 0]

so the update is one (K8, P)^T (K8, N) matmul (row 2R of K is zero, so alpha's slot does not
leak into it) and the readout one (R8, N) (P, N)^T matmul; no transposes, no (n, 1) columns.
The state is updated in place (`input_output_aliases`). Grid (B, H / heads_per_block); the heads
of one block are walked by an in-kernel loop so the per-grid-step overhead is amortised.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba3_jax.ops.rotary import TWO_PI, rotate
from mamba3_jax.ops.ssm import SSMState, lift
from pallas_kernels.tpu._common import (
    SQ,
    check,
    compiler_params,
    mm,
    parallel_and_arbitrary,
)

f32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def _decode_kernel(v_ref, k_ref, q_ref, h_ref, y_ref, ho_ref, *, R: int, hb: int):
    def head(i, carry):
        v = v_ref[i]  # (K8, P)
        alpha = v[2 * R:2 * R + 1, 0:1]  # (1, 1)
        h = h_ref[i].astype(f32)  # (P, N)
        h_new = alpha * h + mm(v, k_ref[i], ta=True, precision=_HIGHEST)
        ho_ref[i] = h_new.astype(ho_ref.dtype)
        y_ref[i] = mm(q_ref[i], h_new, tb=True, precision=_HIGHEST)  # (R8, P)
        return carry

    jax.lax.fori_loop(0, hb, head, 0)


def _pick_heads_per_block(H: int, want: Optional[int]) -> int:
    if want:
        check(H % want == 0, f"heads_per_block {want} must divide nheads {H}")
        return int(want)
    return max(d for d in range(1, min(H, 8) + 1) if H % d == 0)


def ssm_step_tpu(state: SSMState, q, k, x, angle_inc, log_decay, gamma, eta, reset=None,
                 mimo_x=None, *, interpret=False, heads_per_block: Optional[int] = None):
    """Same contract as `mamba3_jax.ops.ssm.ssm_step`: (y (B, R, H, P) float32, new state)."""
    B, R, H, N = q.shape
    P = x.shape[-1]
    hb = _pick_heads_per_block(H, heads_per_block)
    K8 = _round8(2 * R + 1)
    R8 = _round8(R)

    if reset is not None:
        keep = ~reset
        angle0 = jnp.where(keep[:, None, None], state.angle, 0.0)
    else:
        keep = jnp.ones((B,), bool)
        angle0 = state.angle
    angle = jnp.mod(angle0 + angle_inc.astype(f32), TWO_PI)
    qr = rotate(q, angle[:, None])  # (B, R, H, N) f32
    kr = rotate(k, angle[:, None]).astype(k.dtype)  # stored and used at the input precision
    alpha = jnp.exp(log_decay.astype(f32))
    a_eff = jnp.where(keep[:, None], alpha, 0.0)  # (B, H)
    b_eff = jnp.where(keep[:, None], eta.astype(f32) * alpha, 0.0)
    v_prev = lift(state.x_prev, mimo_x) * b_eff[:, None, :, None]  # (B, R, H, P)
    v_now = lift(x, mimo_x) * gamma.astype(f32)[:, None, :, None]

    def heads_major(a):  # (B, rows, H, D) -> (B, H, rows, D)
        return jnp.transpose(a, (0, 2, 1, 3))

    alpha_row = jnp.zeros((B, H, 1, P), f32).at[:, :, 0, 0].set(a_eff)
    V = jnp.concatenate([heads_major(v_prev), heads_major(v_now), alpha_row,
                         jnp.zeros((B, H, K8 - 2 * R - 1, P), f32)], axis=2)
    Kp = jnp.where(keep[:, None, None, None], state.k_prev, 0).astype(f32)
    K = jnp.concatenate([heads_major(Kp), heads_major(kr.astype(f32)),
                         jnp.zeros((B, H, K8 - 2 * R, N), f32)], axis=2)
    Q = jnp.concatenate([heads_major(qr), jnp.zeros((B, H, R8 - R, N), f32)], axis=2)

    par, _ = parallel_and_arbitrary()
    blk = (lambda rows, d: pl.BlockSpec((SQ, hb, rows, d), lambda b, g: (b, g, 0, 0)))
    y8, h_new = pl.pallas_call(
        functools.partial(_decode_kernel, R=R, hb=hb),
        grid=(B, H // hb),
        in_specs=[blk(K8, P), blk(K8, N), blk(R8, N), blk(P, N)],
        out_specs=[blk(R8, P), blk(P, N)],
        out_shape=[jax.ShapeDtypeStruct((B, H, R8, P), f32),
                   jax.ShapeDtypeStruct(state.h.shape, state.h.dtype)],
        input_output_aliases={3: 1},
        compiler_params=compiler_params((par, par)),
        interpret=interpret,
        name="mamba3_tpu_decode",
    )(V, K, Q, state.h)
    y = jnp.transpose(y8[:, :, :R], (0, 2, 1, 3))  # (B, R, H, P)
    new = SSMState(angle=angle, h=h_new, k_prev=kr.astype(state.k_prev.dtype),
                   x_prev=x.astype(state.x_prev.dtype))
    return y, new


def decode_core_tpu(inp, state: SSMState, *, z, D, mimo_x=None, mimo_z=None, mimo_o=None,
                    norm_weight=None, chunk_size: int = 64, norm_eps: float = 1e-5,
                    interpret=False, heads_per_block: Optional[int] = None):
    """`mamba3_jax.backends.mixer_core`'s contract for one token (L == 1) on the decode kernel;
    D, the optional RMSNorm, the gate and the rank sum run in XLA after it."""
    from mamba3_jax.ops.mixer import gate_output
    from mamba3_jax.ops.ssm import per_head

    inp = per_head(inp)
    check(inp.x.shape[1] == 1, f"the decode kernel takes one token, got L={inp.x.shape[1]}")
    reset = None if inp.reset is None else inp.reset[:, 0]
    y, final = ssm_step_tpu(state, inp.q[:, 0], inp.k[:, 0], inp.x[:, 0], inp.angle_inc[:, 0],
                            inp.log_decay[:, 0], inp.gamma[:, 0], inp.eta[:, 0], reset, mimo_x,
                            interpret=interpret, heads_per_block=heads_per_block)
    out = gate_output(y[:, None], inp.x, z, D, mimo_x, mimo_z, mimo_o, norm_weight, norm_eps)
    return out, final
