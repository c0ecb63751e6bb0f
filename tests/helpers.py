"""Shared test helpers: random SSM problems and a norm-wise relative error."""

import jax
import jax.numpy as jnp
import numpy as np

from mamba3_jax.ops.ssm import SSMInputs, SSMState


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a)), "non-finite values"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


TIME_FIELDS = ("q", "k", "x", "angle_inc", "log_decay", "gamma", "eta", "reset")


def time_slice(inp, start, stop=None):
    """The tokens [start, stop) of an SSMInputs (biases, which have no time axis, kept)."""
    return inp._replace(**{f: getattr(inp, f)[:, start:stop] for f in TIME_FIELDS
                           if getattr(inp, f) is not None})


def tree_rel_err(a, b) -> float:
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def random_problem(seed, *, B=2, L=37, R=1, H=3, N=8, P=4, S=2, dtype=jnp.float32,
                   reset_prob=0.0, init_state=True, mimo=None):
    """Random SSM inputs with realistic ranges (dt ~ softplus, A < 0, lam in (0, 1))."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 13)
    q = jax.random.normal(ks[0], (B, L, R, H, N)).astype(dtype)
    k = jax.random.normal(ks[1], (B, L, R, H, N)).astype(dtype)
    x = jax.random.normal(ks[2], (B, L, H, P)).astype(dtype)
    inc = jax.random.normal(ks[3], (B, L, H, S)) * 0.5
    dt = jax.nn.softplus(jax.random.normal(ks[4], (B, L, H)) - 1.0)
    A = -jax.nn.softplus(jax.random.normal(ks[5], (B, L, H)))
    lam = jax.nn.sigmoid(jax.random.normal(ks[6], (B, L, H)))
    reset = None
    if reset_prob:
        reset = jax.random.uniform(ks[7], (B, L)) < reset_prob
    inp = SSMInputs(q, k, x, inc, A * dt, lam * dt, (1 - lam) * dt, reset)
    if init_state:
        st = SSMState(jax.random.normal(ks[8], (B, H, S)),
                      jax.random.normal(ks[9], (B, H, P, N)),
                      jax.random.normal(ks[10], (B, R, H, N)).astype(dtype),
                      jax.random.normal(ks[11], (B, H, P)).astype(dtype))
    else:
        st = SSMState.zeros(B, H, P, N, S, R, dtype=dtype)
    use_mimo = (R > 1) if mimo is None else mimo
    mimo_x = 1.0 + 0.3 * jax.random.normal(ks[12], (H, R, P)) if use_mimo else None
    return inp, st, mimo_x
