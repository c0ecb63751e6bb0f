"""Random Mamba-3 SSM problems and tolerances shared by the kernel tests.

The tests run the Pallas kernels for real on a GPU and in interpret mode on the CPU (CI).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mamba3_jax.ops.ssm import SSMInputs, SSMState

ON_GPU = jax.default_backend() in ("gpu", "cuda")
INTERPRET = not ON_GPU

# Relative L2 tolerances (|a - b| / |b|). float32: exact dots in interpret mode, 3xTF32 on the
# GPU. bfloat16: the kernels round the MMA operands (rotated q/k, x, masked scores, state) to
# bf16 like the XLA chunked form does, the reference does not.
TOL = {"float32": 2e-5, "bfloat16": 3e-2}
GRAD_TOL = {"float32": 5e-5, "bfloat16": 6e-2}


def rel(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def make_problem(seed, B, L, R, H, N, P, S, dtype=jnp.float32, resets=False, state_dtype=None,
                 norm=False, groups=None):
    """SSMInputs, SSMState and the epilogue parameters, all random (nothing zero).

    groups=None: per-head q, k (B, L, R, H, N); groups=G: q, k per B/C group (B, L, R, G, N)
    with random per-head biases q_bias, k_bias (H, R, N)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 20)
    nqk = H if groups is None else groups
    q = jax.random.normal(ks[0], (B, L, R, nqk, N)) * 0.5
    k = jax.random.normal(ks[1], (B, L, R, nqk, N)) * 0.5
    x = jax.random.normal(ks[2], (B, L, H, P))
    z = jax.random.normal(ks[3], (B, L, H, P))
    dt = jax.nn.softplus(jax.random.normal(ks[4], (B, L, H)) - 1.0)
    A = -jnp.exp(jax.random.normal(ks[5], (B, L, H)) * 0.5)
    lam = jax.nn.sigmoid(jax.random.normal(ks[6], (B, L, H)))
    inc = jnp.pi * jnp.tanh(jax.random.normal(ks[7], (B, L, S)))[:, :, None, :] * dt[..., None]
    reset = (jax.random.uniform(ks[8], (B, L)) < 0.08) if resets else None
    inp = SSMInputs(q.astype(dtype), k.astype(dtype), x.astype(dtype), inc, A * dt, lam * dt,
                    (1 - lam) * dt, reset)
    if groups is not None:
        inp = inp._replace(q_bias=jax.random.normal(ks[18], (H, R, N)) * 0.5 + 1.0,
                           k_bias=jax.random.normal(ks[19], (H, R, N)) * 0.5 + 1.0)
    state = SSMState(
        angle=jax.random.uniform(ks[9], (B, H, S)) * 6.0,
        h=(jax.random.normal(ks[10], (B, H, P, N)) * 0.3).astype(state_dtype or jnp.float32),
        k_prev=(jax.random.normal(ks[11], (B, R, H, N)) * 0.5).astype(dtype),
        x_prev=jax.random.normal(ks[12], (B, H, P)).astype(dtype))
    params = dict(z=z.astype(dtype), D=jax.random.normal(ks[13], (H,)))
    if R > 1:
        mx, mz, mo = (jax.random.normal(kk, (H, R, P)) * 0.5 + 1.0
                      for kk in jax.random.split(ks[14], 3))
        params.update(mimo_x=mx, mimo_z=mz, mimo_o=mo)
    if norm:
        params["norm_weight"] = jax.random.normal(ks[15], (H, P)) * 0.5 + 1.0
    return inp, state, params


def random_like(tree, seed):
    """Random cotangents for the floating leaves of `tree` (None elsewhere)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [jax.random.normal(kk, a.shape, jnp.float32).astype(a.dtype)
           if jnp.issubdtype(a.dtype, jnp.floating) else None
           for kk, a in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, out)
