"""Shared pieces of the TPU kernel tests: problems, epilogue parameters, jitted runners.

The kernels run in Pallas interpret mode on the CPU (exact float32 dots there), so float32
tolerances are tight. Problems are drawn with numpy (eager jax.random calls would each compile),
and every runner is a module-level `jax.jit`, so tests with equal shapes share one compilation:
interpret-mode compiles dominate the run time, hence the few distinct shapes below.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mamba3_jax import backends
from mamba3_jax.ops.mixer import gate_output
from mamba3_jax.ops.ssm import SSMInputs, SSMState, ssm_reference
from pallas_kernels.tpu import ssm_rows_tpu

TOL = {"float32": 2e-5, "bfloat16": 3e-2}
GRAD_TOL = {"float32": 5e-5, "bfloat16": 3e-2}
B, H, N, P, S = 2, 3, 8, 4, 2  # tiny: interpret mode is slow
CHUNK = 8


def f32_tree(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, tree)


def _softplus(a):
    return np.logaddexp(0.0, a)


def problem(seed, *, L, R, dtype=jnp.float32, reset_prob=0.0, init_state=True, groups=None):
    """Random SSM inputs with realistic ranges (dt ~ softplus, A < 0, lam in (0, 1)).

    groups: None for per-head q/k, else G (q/k per B/C group, per-head biases in q_bias/k_bias).
    """
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    G = H if groups is None else groups
    q = jnp.asarray(normal(B, L, R, G, N), dtype)
    k = jnp.asarray(normal(B, L, R, G, N), dtype)
    x = jnp.asarray(normal(B, L, H, P), dtype)
    inc = jnp.asarray(normal(B, L, H, S) * 0.5)
    dt = _softplus(normal(B, L, H) - 1.0)
    A = -_softplus(normal(B, L, H))
    lam = 1.0 / (1.0 + np.exp(-normal(B, L, H)))
    reset = jnp.asarray(rng.uniform(size=(B, L)) < reset_prob) if reset_prob else None
    biases = {}
    if groups is not None:
        biases = dict(q_bias=jnp.asarray(normal(H, R, N)), k_bias=jnp.asarray(normal(H, R, N)))
    inp = SSMInputs(q, k, x, inc, jnp.asarray(A * dt), jnp.asarray(lam * dt),
                    jnp.asarray((1 - lam) * dt), reset, **biases)
    if init_state:
        st = SSMState(jnp.asarray(normal(B, H, S)), jnp.asarray(normal(B, H, P, N)),
                      jnp.asarray(normal(B, R, H, N), dtype), jnp.asarray(normal(B, H, P), dtype))
    else:
        st = SSMState.zeros(B, H, P, N, S, R, dtype=dtype)
    mimo_x = jnp.asarray(1.0 + 0.3 * normal(H, R, P)) if R > 1 else None
    return inp, st, mimo_x


def epilogue(seed, R, *, mimo: bool, norm: bool, L: int):
    """z (B, L, H, P) and the gate parameters of `gate_output`."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32))

    p = dict(D=normal(H), mimo_z=None, mimo_o=None, norm_weight=None)
    if mimo:
        p["mimo_z"] = 1.0 + 0.3 * normal(H, R, P)
        p["mimo_o"] = 0.5 + 0.3 * normal(H, R, P)
    if norm:
        p["norm_weight"] = 1.0 + 0.2 * normal(H, P)
    return normal(B, L, H, P), p


@functools.partial(jax.jit, static_argnames=("chunk",))
def run_ssm(inp, state, mimo_x, chunk=CHUNK):
    return ssm_rows_tpu(inp, state, mimo_x=mimo_x, chunk_size=chunk, interpret=True)


@jax.jit
def run_reference(inp, state, mimo_x):
    return ssm_reference(inp, state, mimo_x)


@functools.partial(jax.jit, static_argnames=("backend",))
def run_backend(inp, state, z, params, mimo_x, backend):
    backends.resolve("pallas_interpret")  # loads and registers the Pallas backends
    return backends.mixer_core(inp, state, backend=backend, z=z, mimo_x=mimo_x,
                               chunk_size=CHUNK, **params)


@jax.jit
def run_gated_reference(inp, state, z, params, mimo_x):
    y, final = ssm_reference(inp, state, mimo_x)
    out = gate_output(y, inp.x, z, params["D"], mimo_x, params["mimo_z"], params["mimo_o"],
                      params["norm_weight"])
    return out, final


def _loss(fn, inp, reset, state, mimo_x, cot):
    """A scalar touching every output: y and all four parts of the final state."""
    y, f = fn(inp._replace(reset=reset), state, mimo_x)
    return (jnp.sum(y * cot) + jnp.sum(f.h * 0.3) + jnp.sum(jnp.sin(f.angle))
            + jnp.sum(f.k_prev.astype(jnp.float32) * 0.7)
            + jnp.sum(f.x_prev.astype(jnp.float32) * 0.2))


def tpu_interpret_params():
    """Pallas' TPU-faithful interpreter (simulated VMEM/DMA, uninitialized memory poisoned with
    NaN), where this jax has it; else plain interpret mode."""
    from jax.experimental.pallas import tpu as pltpu

    cls = getattr(pltpu, "InterpretParams", None)
    return cls(uninitialized_memory="nan") if cls is not None else True


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def grad_kernel(inp, reset, state, mimo_x, cot, chunk=CHUNK, interpret=True):
    def fn(i, s, m):
        return ssm_rows_tpu(i, s, mimo_x=m, chunk_size=chunk, interpret=interpret)

    return jax.grad(lambda i, s, m: _loss(fn, i, reset, s, m, cot), argnums=(0, 1, 2))(
        inp, state, mimo_x)


@jax.jit
def grad_reference(inp, reset, state, mimo_x, cot):
    return jax.grad(lambda i, s, m: _loss(ssm_reference, i, reset, s, m, cot),
                    argnums=(0, 1, 2))(inp, state, mimo_x)
