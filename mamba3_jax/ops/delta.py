"""The gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024) as pure functions.

Per head, a state S (P x N) maps keys to values. With alpha_t = exp(log_decay_t) in (0, 1] and a
write strength beta_t:

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,      y_t = S_t q_t

i.e. decay the state, then move its prediction for k_t a fraction beta_t towards v_t. With unit
keys, the transition alpha (I - beta k k^T) has eigenvalues alpha (along the other directions)
and alpha (1 - beta) along k: beta in (0, 1) keeps them in [0, 1], beta in (0, 2) lets them reach
-1 (the variant the Mamba-3 paper uses for state tracking).

Forms, same arguments and results (y (B, L, H, P) float32, the state after the last token):
  * `delta_reference` a lax.scan of `delta_step` (the decode step): ground truth.
  * `delta_chunked`   per chunk of C tokens, the chunk's writes u_t = beta_t (v_t - alpha_t
                      S_{t-1} k_t) solve one unit lower-triangular system (a matmul-friendly
                      rewrite of the token loop), then the state is carried chunk to chunk.
`reset` (B, L) marks the first token of a packed document: the state restarts there.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

f32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| over the last axis (float32 maths, x's dtype out): unit keys keep the
    transition's eigenvalues within the range set by beta."""
    xf = x.astype(f32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def unit_lower_inverse(A: jax.Array, precision=None) -> jax.Array:
    """(I + A)^{-1} for strictly lower-triangular A (..., C, C), by matmuls only.

    Doubling over block sizes b = 1, 2, 4, ...: the inverse of [[I + A11, 0], [A21, I + A22]]
    is [[T11, 0], [-T22 A21 T11, T22]], so each level merges pairs of diagonal blocks of the
    inverse. Every product involves blocks of the inverse itself (as stable as forward
    substitution; no powers of A, which overflow when beta approaches 2). Not
    `lax.linalg.triangular_solve`: jaxlib's CPU kernel for it can deadlock when two run at
    once on a small thread pool. C is padded up to a power of two with zeros (identity rows).
    """
    C = A.shape[-1]
    n = 1 << (C - 1).bit_length()
    if n != C:
        A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, n - C), (0, n - C)])
    batch = A.shape[:-2]
    D = jnp.ones(batch + (n, 1, 1), A.dtype)  # diagonal blocks of the inverse, size b
    b = 1
    while b < n:
        m = jnp.arange(n // (2 * b))
        rows = (2 * m + 1)[:, None] * b + jnp.arange(b)  # block (2m+1, 2m) of A
        cols = (2 * m)[:, None] * b + jnp.arange(b)
        A21 = A[..., rows[:, :, None], cols[:, None, :]]  # (..., n / 2b, b, b)
        D11, D22 = D[..., 0::2, :, :], D[..., 1::2, :, :]
        X = -jnp.matmul(jnp.matmul(D22, A21, precision=precision), D11, precision=precision)
        top = jnp.concatenate([D11, jnp.zeros_like(D11)], axis=-1)
        D = jnp.concatenate([top, jnp.concatenate([X, D22], axis=-1)], axis=-2)
        b *= 2
    return D[..., 0, :C, :C]


def delta_step(S, q, k, v, log_decay, beta, reset=None):
    """One token for a batch. S (B, H, P, N); q, k (B, H, N); v (B, H, P); log_decay, beta
    (B, H); reset (B,) bool or None. Returns (y (B, H, P) float32, S float32)."""
    S = S.astype(f32)
    if reset is not None:
        S = jnp.where(reset[:, None, None, None], 0.0, S)
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    S = jnp.exp(log_decay)[..., None, None] * S
    pred = jnp.einsum("bhpn,bhn->bhp", S, k, precision=HIGHEST)
    S = S + jnp.einsum("bhp,bhn->bhpn", beta[..., None] * (v - pred), k, precision=HIGHEST)
    return jnp.einsum("bhpn,bhn->bhp", S, q, precision=HIGHEST), S


def delta_reference(q, k, v, log_decay, beta, state, reset=None, **_):
    """Ground truth: `delta_step` scanned over time. q, k (B, L, H, N); v (B, L, H, P);
    log_decay, beta (B, L, H) float32; state (B, H, P, N); reset (B, L) bool or None."""
    if reset is None:
        reset = jnp.zeros(q.shape[:2], bool)
    xs = tuple(jnp.swapaxes(a, 0, 1) for a in (q, k, v, log_decay, beta, reset))

    def body(S, t_in):
        y, S = delta_step(S, *t_in)
        return S, y

    S, ys = jax.lax.scan(body, state.astype(f32), xs)
    return jnp.swapaxes(ys, 0, 1), S.astype(state.dtype)


def delta_chunked(q, k, v, log_decay, beta, state, reset=None, chunk_size: int = 64, **_):
    """Chunked form, same arguments and results as `delta_reference`.

    Inside a chunk entering with state S0, let g_t = sum_{i<=t} log alpha_i and write the
    recurrence as S_t = alpha_t S_{t-1} + u_t k_t^T. Then S_t = e^{g_t} S0 + sum_{s<=t}
    e^{g_t - g_s} u_s k_s^T, and the writes satisfy, for all t of the chunk at once,
        u_t + beta_t sum_{s<t} e^{g_t - g_s} (k_t . k_s) u_s = beta_t v_t - beta_t e^{g_t} S0 k_t,
    a unit lower-triangular system (I + A) U = beta V - beta e^g K S0^T. Its solution is
    U = Ut - W S0^T with Ut, W from one triangular solve independent of S0, so everything but
    three (C x N)-by-(N x P) products per chunk runs in parallel over chunks. The inverse of
    I + A is formed by matmuls (`unit_lower_inverse`).
    """
    B, L, H, N = q.shape
    P = v.shape[-1]
    C = int(chunk_size)
    prec = HIGHEST if q.dtype == f32 else None
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    reset = jnp.zeros((B, L), bool) if reset is None else reset
    pad = (-L) % C
    if pad:  # padded tokens: beta = 0 writes nothing, log_decay = 0 keeps the state
        def padt(a):
            return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        q, k, v, log_decay, beta, reset = map(padt, (q, k, v, log_decay, beta, reset))
    nc = (L + pad) // C

    def chunks(a):  # (B, L, H, ...) -> (B, nc, H, C, ...)
        return jnp.moveaxis(a.reshape((B, nc, C) + a.shape[2:]), 3, 2)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    bc = chunks(beta)  # (B, nc, H, C)
    g = jnp.cumsum(chunks(log_decay), axis=-1)
    seg = jnp.cumsum(reset.reshape(B, nc, C).astype(jnp.int32), axis=-1)  # resets so far
    idx = jnp.arange(C)
    # decay[t, s] = e^{g_t - g_s} for s <= t in the same document, else 0
    live = (idx[:, None] >= idx[None, :]) & (seg[..., :, None] == seg[..., None, :])
    decay = jnp.exp(jnp.where(live[:, :, None], g[..., :, None] - g[..., None, :], -jnp.inf))
    strict = decay * (idx[:, None] > idx[None, :])
    from_start = jnp.exp(g) * (seg == 0)[:, :, None]  # e^{g_t} where S0 still reaches t

    kk = jnp.einsum("bchtn,bchsn->bchts", kc, kc, precision=prec)
    A = bc[..., None] * strict * kk
    rhs = jnp.concatenate([bc[..., None] * vc, (bc * from_start)[..., None] * kc], axis=-1)
    sol = jnp.matmul(unit_lower_inverse(A, prec), rhs, precision=prec)
    Ut, W = sol[..., :P], sol[..., P:]
    qk = jnp.einsum("bchtn,bchsn->bchts", qc, kc, precision=prec) * decay
    q_in = qc * from_start[..., None]
    last = seg[..., -1:]
    to_end = jnp.exp(g[..., -1:] - g) * (seg == last)[:, :, None]  # (B, nc, H, C)
    chunk_decay = jnp.exp(g[..., -1]) * (last == 0)  # (B, nc, H)

    def body(S, c_in):
        Ut_c, W_c, qk_c, q_c, k_c, end_c, dec_c = c_in
        U = Ut_c - jnp.einsum("bhcn,bhpn->bhcp", W_c, S, precision=prec)
        y = (jnp.einsum("bhcn,bhpn->bhcp", q_c, S, precision=prec)
             + jnp.einsum("bhts,bhsp->bhtp", qk_c, U, precision=prec))
        S = dec_c[..., None, None] * S + jnp.einsum("bhsp,bhsn->bhpn", U * end_c[..., None],
                                                    k_c, precision=prec)
        return S, y

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (Ut, W, qk, q_in, kc, to_end, chunk_decay))
    S, y = jax.lax.scan(body, state.astype(f32), xs)  # y (nc, B, H, C, P)
    y = jnp.moveaxis(y, 0, 1)  # (B, nc, H, C, P)
    y = jnp.moveaxis(y, 2, 3).reshape(B, nc * C, H, P)[:, :L]
    return y, S.astype(state.dtype)


DELTA_FORMS: dict[str, Callable] = {"reference": delta_reference, "chunked": delta_chunked}


def delta_rule(q, k, v, log_decay, beta, state, reset: Optional[jax.Array] = None, *,
               form: str = "chunked", chunk_size: int = 64):
    """Run the gated delta rule with the named form (see DELTA_FORMS)."""
    try:
        fn = DELTA_FORMS[form]
    except KeyError:
        raise ValueError(f"unknown delta-rule form {form!r}; available: "
                         f"{sorted(DELTA_FORMS)}") from None
    return fn(q, k, v, log_decay, beta, state, reset, chunk_size=chunk_size)
