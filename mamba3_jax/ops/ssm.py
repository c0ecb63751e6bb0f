"""The Mamba-3 SSM (exponential-trapezoidal, rank-R) in three interchangeable forms.

Per head, with k = rotated biased B, q = rotated biased C, v^(r) = x * mimo_x[r]:

    h_t = alpha_t h_{t-1} + beta_t sum_r v_{t-1}^(r) k_{t-1,r}^T + gamma_t sum_r v_t^(r) k_{t,r}^T
    y_t^(r) = h_t q_{t,r}

with alpha = exp(log_decay), beta = eta * alpha. Forms:
  * `ssm_reference`  a lax.scan of `ssm_step` (the decode step): ground truth.
  * `ssm_associative` jax.lax.associative_scan over (alpha_t, input_t).
  * `ssm_chunked`    SSD-style matmuls; the trapezoid folds into a per-key scale
                     scale_s = gamma_s + eta_{s+1}, only gamma_t stays on the diagonal.

All take the same `SSMInputs` (q, k still unrotated: the rotation is part of the SSM so that a
fused kernel can take it over) and an `SSMState`, and return y (B, L, R, H, P) float32 and the
state after the last token. `reset` (B, L) marks the first token of a packed segment: the state,
the previous-token term and the angle accumulator restart there.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mamba3_jax.ops.matmul import einsum_f32
from mamba3_jax.ops.rotary import TWO_PI, cumulative_angles, linear_scan, rotate

f32 = jnp.float32


class SSMState(NamedTuple):
    """Recurrent state handed from prefill to decode (one layer)."""

    angle: jax.Array  # (B, H, S) float32: cumulative rotary angle, mod 2 pi
    h: jax.Array  # (B, H, P, N) float32 (or bfloat16 when stored that way for decode)
    k_prev: jax.Array  # (B, R, H, N): previous token's rotated biased B, not scaled by dt
    x_prev: jax.Array  # (B, H, P): previous token's raw x, not lifted by mimo_x

    @staticmethod
    def zeros(batch, nheads, headdim, d_state, num_angles, rank, dtype=f32, state_dtype=f32):
        return SSMState(
            angle=jnp.zeros((batch, nheads, num_angles), f32),
            h=jnp.zeros((batch, nheads, headdim, d_state), state_dtype),
            k_prev=jnp.zeros((batch, rank, nheads, d_state), dtype),
            x_prev=jnp.zeros((batch, nheads, headdim), dtype),
        )


class SSMInputs(NamedTuple):
    """Inputs of the SSM. q and k are either per head, biased, (B, L, R, H, N), or per B/C group
    (B, L, R, G, N) with the per-head biases in q_bias / k_bias (H, R, N): the group form lets a
    kernel read G (usually 1) vectors per token instead of H. `per_head` expands it."""

    q: jax.Array  # (B, L, R, H or G, N) C after BCNorm, not rotated
    k: jax.Array  # (B, L, R, H or G, N) B after BCNorm, not rotated
    x: jax.Array  # (B, L, H, P)
    angle_inc: jax.Array  # (B, L, H, S) float32 angle increments
    log_decay: jax.Array  # (B, L, H) float32, A * dt
    gamma: jax.Array  # (B, L, H) float32, lam * dt
    eta: jax.Array  # (B, L, H) float32, (1 - lam) * dt
    reset: Optional[jax.Array] = None  # (B, L) bool, True at the first token of a segment
    q_bias: Optional[jax.Array] = None  # (H, R, N) float32, added to q per head
    k_bias: Optional[jax.Array] = None  # (H, R, N) float32
    # Optionally the factors of angle_inc = angle_rate * angle_dt[..., None]: angle_rate
    # (B, L, Ha, S) float32 with Ha dividing H (head h uses h // (H / Ha); the model's is shared,
    # Ha = 1), angle_dt (B, L, H). A backend may use them instead of angle_inc (the GPU kernels
    # form the per-head increments in registers); the others read angle_inc.
    angle_rate: Optional[jax.Array] = None
    angle_dt: Optional[jax.Array] = None
    # Optionally the rate before its activation, angle_rate = pi tanh(angle_pre) (B, L, Ha, S),
    # in any dtype (given with angle_rate, and equal to it through that map). The GPU rotation
    # kernels then read it (bf16: a quarter of the bytes XLA spends writing and reading a float32
    # rate) and apply pi tanh in registers, as the official kernels take their raw angles.
    angle_pre: Optional[jax.Array] = None


def per_head(inp: SSMInputs) -> SSMInputs:
    """Expand group-level q, k to heads (head h reads group h // (H / G)) and add the biases."""
    H = inp.x.shape[2]

    def expand(v, bias):
        if v.shape[3] != H:
            if H % v.shape[3]:
                raise ValueError(f"{v.shape[3]} B/C groups do not divide {H} heads")
            v = jnp.repeat(v, H // v.shape[3], axis=3)
        if bias is not None:
            v = (v.astype(f32) + jnp.swapaxes(bias, 0, 1).astype(f32)).astype(v.dtype)
        return v

    if inp.q.shape[3] == H and inp.q_bias is None and inp.k_bias is None:
        return inp
    return inp._replace(q=expand(inp.q, inp.q_bias), k=expand(inp.k, inp.k_bias),
                        q_bias=None, k_bias=None)


def reset_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
    """A segment starts where the id changes; position 0 continues the state passed in."""
    first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def reset_from_positions(positions: jax.Array) -> jax.Array:
    """A segment starts where the position within the document is 0 (also at t = 0)."""
    return positions == 0


def lift(x: jax.Array, mimo_x: Optional[jax.Array]) -> jax.Array:
    """x (..., H, P) -> per-rank inputs (..., R, H, P); mimo_x (H, R, P) or None (SISO, R = 1)."""
    x = x.astype(f32)
    if mimo_x is None:
        return x[..., None, :, :]
    return x[..., None, :, :] * jnp.swapaxes(mimo_x, 0, 1).astype(f32)


def _dot_precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ----------------------------------------------------------------------------- step / reference


def step_start(state: SSMState, q, k, angle_inc, reset=None):
    """What every form of the decode step does first: the state cleared where a segment
    starts, the new angle and q, k rotated by it (q float32, k at its input precision, as it is
    stored and used). Returns (state, angle, q rotated, k rotated)."""
    if reset is not None:
        keep = ~reset
        state = SSMState(*(jnp.where(keep.reshape((-1,) + (1,) * (s.ndim - 1)), s,
                                     jnp.zeros_like(s)) for s in state))
    angle = jnp.mod(state.angle + angle_inc.astype(f32), TWO_PI)
    return (state, angle) + rotated_qk(q, k, angle)


def rotated_qk(q, k, angle):
    """q, k (B, R, H, N) rotated by the step's angle (B, H, S): q float32, k at its input
    precision (as it is stored as the next k_prev and used)."""
    return rotate(q, angle[:, None]), rotate(k, angle[:, None]).astype(k.dtype)


def ssm_step(state: SSMState, q, k, x, angle_inc, log_decay, gamma, eta, reset=None,
             mimo_x=None):
    """One token for a batch. q, k (B, R, H, N); x (B, H, P); angle_inc (B, H, S);
    log_decay, gamma, eta (B, H); reset (B,) bool or None. Returns (y (B, R, H, P) f32, state).

    The rank sums are broadcast products and one reduce, not einsums: XLA then fuses the whole
    update and readout into one pass over h (an einsum over R became float32 GEMMs and extra
    passes). H200, B 128 H 64 P 64 N 128: 114 vs 125 us (SISO, float32 state), 393 vs 463 us
    (R 4, bfloat16; `experiments/bench_decode_step.py`, docs/benchmarks.md)."""
    state, angle, qr, kr = step_start(state, q, k, angle_inc, reset)
    alpha = jnp.exp(log_decay)
    xl, xpl = lift(x, mimo_x), lift(state.x_prev, mimo_x)  # (B, R, H, P)
    kp, kf = state.k_prev.astype(f32), kr.astype(f32)
    h = alpha[..., None, None] * state.h.astype(f32)
    for r in range(q.shape[1]):
        h = (h + ((eta * alpha)[..., None] * xpl[:, r])[..., None] * kp[:, r, :, None, :]
             + (gamma[..., None] * xl[:, r])[..., None] * kf[:, r, :, None, :])
    y = jnp.sum(h[:, None] * qr[:, :, :, None, :], axis=-1)
    return y, SSMState(angle=angle, h=h.astype(state.h.dtype), k_prev=kr,
                       x_prev=x.astype(state.x_prev.dtype))


def ssm_reference(inp: SSMInputs, state: SSMState, mimo_x=None, **_):
    """Ground truth: the decode step scanned over time."""
    inp = per_head(inp)
    reset = inp.reset
    if reset is None:
        reset = jnp.zeros(inp.x.shape[:2], bool)
    xs = (inp.q, inp.k, inp.x, inp.angle_inc, inp.log_decay, inp.gamma, inp.eta, reset)
    xs = tuple(jnp.swapaxes(a, 0, 1) for a in xs)

    def body(carry, t_in):
        q, k, x, inc, ld, g, e, r = t_in
        y, carry = ssm_step(carry, q, k, x, inc, ld, g, e, r, mimo_x)
        return carry, y

    final, ys = jax.lax.scan(body, state._replace(h=state.h.astype(f32)), xs)
    # the state accumulates in f32 within the call and is stored back in its own dtype
    return jnp.swapaxes(ys, 0, 1), final._replace(h=final.h.astype(state.h.dtype))


# ----------------------------------------------------------------------------- shared parallel prep


def _rotate_all(inp: SSMInputs, state: SSMState):
    theta = cumulative_angles(inp.angle_inc, inp.reset, state.angle)  # (B, L, H, S)
    qr = rotate(inp.q, theta[:, :, None]).astype(inp.q.dtype)
    kr = rotate(inp.k, theta[:, :, None]).astype(inp.k.dtype)
    return theta, qr, kr


def _final_state(inp, state, theta, h_last, kr):
    return SSMState(angle=jnp.mod(theta[:, -1], TWO_PI), h=h_last.astype(state.h.dtype),
                    k_prev=kr[:, -1].astype(state.k_prev.dtype),
                    x_prev=inp.x[:, -1].astype(state.x_prev.dtype))


def _masked_eta(inp: SSMInputs):
    """eta_t with the previous-token term removed where a segment starts."""
    if inp.reset is None:
        return inp.eta
    return jnp.where(inp.reset[..., None], 0.0, inp.eta)


# ----------------------------------------------------------------------------- associative


def ssm_associative(inp: SSMInputs, state: SSMState, mimo_x=None, **_):
    """h_t for all t by an associative scan of pairs (alpha_t, u_t), trapezoid folded into u."""
    hp = jax.lax.Precision.HIGHEST
    inp = per_head(inp)
    theta, qr, kr = _rotate_all(inp, state)
    alpha = jnp.exp(inp.log_decay)
    if inp.reset is not None:
        alpha = jnp.where(inp.reset[..., None], 0.0, alpha)
    eta = _masked_eta(inp)
    kv = jnp.einsum("blrhp,blrhn->blhpn", lift(inp.x, mimo_x), kr.astype(f32), precision=hp)
    kv0 = jnp.einsum("brhp,brhn->bhpn", lift(state.x_prev, mimo_x), state.k_prev.astype(f32),
                     precision=hp)
    kv_prev = jnp.concatenate([kv0[:, None], kv[:, :-1]], axis=1)
    u = (eta * alpha)[..., None, None] * kv_prev + inp.gamma[..., None, None] * kv
    u = u.at[:, 0].add(alpha[:, 0, :, None, None] * state.h.astype(f32))
    h = linear_scan(alpha, u, axis=1)  # (B, L, H, P, N)
    y = jnp.einsum("blhpn,blrhn->blrhp", h, qr.astype(f32), precision=hp)
    return y, _final_state(inp, state, theta, h[:, -1], kr)


# ----------------------------------------------------------------------------- chunked


def ssm_chunked(inp: SSMInputs, state: SSMState, mimo_x=None, chunk_size: int = 64, **_):
    """SSD-style chunked form: masked matmuls inside a chunk, a carried state across chunks.

    With the augmented state g_t = h_t + eta_{t+1} sum_r v_t k_t^T, the recurrence becomes
    g_t = alpha_t g_{t-1} + scale_t kv_t (Mamba-2 with a per-key scale), and
    y_t = g_{t-1}-readout + sum_{s<t} decay(t,s) scale_s (q_t.k_s) v_s + gamma_t (q_t.k_t) v_t.
    """
    inp = per_head(inp)
    B, L, R, H, N = inp.q.shape
    C = int(chunk_size)
    cdt = inp.q.dtype
    prec = _dot_precision(cdt)
    theta, qr, kr = _rotate_all(inp, state)
    eta = _masked_eta(inp)
    reset = jnp.zeros((B, L), bool) if inp.reset is None else inp.reset
    scale = inp.gamma + jnp.concatenate([eta[:, 1:], jnp.zeros_like(eta[:, :1])], axis=1)
    v = lift(inp.x, mimo_x).astype(cdt)  # (B, L, R, H, P)

    pad = (-L) % C
    if pad:
        def padt(a):
            return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        qr, kr, v, scale, reset = map(padt, (qr, kr, v, scale, reset))
        log_decay, gamma = padt(inp.log_decay), padt(inp.gamma)
    else:
        log_decay, gamma = inp.log_decay, inp.gamma
    nc = (L + pad) // C

    def chunks(a):  # (B, L, ...) -> (B, nc, C, ...)
        return a.reshape((B, nc, C) + a.shape[2:])

    qc, kc, vc = chunks(qr), chunks(kr), chunks(v)
    ld = jnp.moveaxis(chunks(log_decay), -1, 2)  # (B, nc, H, C)
    sc = jnp.moveaxis(chunks(scale), -1, 2)
    gm = jnp.moveaxis(chunks(gamma), -1, 2)
    seg = jnp.cumsum(chunks(reset).astype(jnp.int32), axis=-1)  # (B, nc, C): resets so far
    cs = jnp.cumsum(ld, axis=-1)  # (B, nc, H, C)

    # intra-chunk: W[t, s] = exp(cs_t - cs_s) scale_s (s < t, same segment) + gamma_t (s == t)
    idx = jnp.arange(C)
    same_seg = seg[..., :, None] == seg[..., None, :]  # (B, nc, C, C)
    strict = (idx[:, None] > idx[None, :]) & same_seg
    strict = strict[:, :, None]  # (B, nc, 1, C, C)
    diff = cs[..., :, None] - cs[..., None, :]
    decay = jnp.exp(jnp.where(strict, diff, -jnp.inf))
    W = decay * sc[..., None, :] + jnp.eye(C, dtype=f32) * gm[..., :, None]  # (B, nc, H, C, C)
    scores = einsum_f32("bctrhn,bcsuhn->bchtrsu", qc, kc, precision=prec)
    scores = (scores * W[:, :, :, :, None, :, None]).astype(cdt)
    y = einsum_f32("bchtrsu,bcsuhp->bctrhp", scores, vc, precision=prec)

    # chunk-local end states and the carried state across chunks
    last_seg = seg[..., -1:]
    to_end = jnp.exp(cs[..., -1:] - cs) * sc * (seg == last_seg)[:, :, None]  # (B, nc, H, C)
    kc_w = (kc.astype(f32) * jnp.moveaxis(to_end, 2, -1)[:, :, :, None, :, None]).astype(cdt)
    local = einsum_f32("bcsuhp,bcsuhn->bchpn", vc, kc_w, precision=prec)
    chunk_decay = jnp.exp(cs[..., -1]) * (last_seg[..., 0] == 0)[:, :, None]  # (B, nc, H)

    kv0 = jnp.einsum("brhp,brhn->bhpn", lift(state.x_prev, mimo_x), state.k_prev.astype(f32),
                     precision=jax.lax.Precision.HIGHEST)
    g0 = state.h.astype(f32) + eta[:, 0, :, None, None] * kv0

    def carry_fn(g, c_in):
        dec, loc = c_in
        return dec[..., None, None] * g + loc, g

    g_last, g_in = jax.lax.scan(carry_fn, g0, (jnp.moveaxis(chunk_decay, 1, 0),
                                               jnp.moveaxis(local, 1, 0)))
    g_in = jnp.moveaxis(g_in, 0, 1)  # (B, nc, H, P, N): state entering each chunk
    from_start = jnp.exp(cs) * (seg == 0)[:, :, None]  # (B, nc, H, C)
    y_in = jnp.einsum("bchpn,bctrhn->bctrhp", g_in, qc.astype(f32),
                      precision=jax.lax.Precision.HIGHEST)
    y = y + y_in * jnp.moveaxis(from_start, 2, -1)[:, :, :, None, :, None]
    y = y.reshape((B, nc * C) + y.shape[3:])[:, :L]
    return y, _final_state(inp, state, theta, g_last, kr[:, :L])


# ----------------------------------------------------------------------------- registry

SSM_FORMS: dict[str, Callable] = {
    "reference": ssm_reference,
    "associative": ssm_associative,
    "chunked": ssm_chunked,
}


def ssm(inp: SSMInputs, state: SSMState, mimo_x=None, *, form: str = "chunked",
        chunk_size: int = 64):
    """Run the SSM with the named form (see SSM_FORMS)."""
    try:
        fn = SSM_FORMS[form]
    except KeyError:
        raise ValueError(f"unknown SSM form {form!r}; available: {sorted(SSM_FORMS)}") from None
    return fn(inp, state, mimo_x, chunk_size=chunk_size)
