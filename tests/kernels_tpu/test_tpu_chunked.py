"""The chunked TPU kernels (interpret mode) against the sequential reference.

Two main shapes keep compilations shared: SISO L = 37 (five chunks, padded tail) and MIMO R = 2
L = 24 (16 rows per chunk); the hand-over test adds L = 5 (< one chunk) and L = 19.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba3_jax import backends
from mamba3_jax.ops.ssm import SSMInputs
from tests.helpers import rel_err, time_slice, tree_rel_err
from tests.kernels_tpu.tpu_cases import (
    GRAD_TOL,
    TOL,
    epilogue,
    f32_tree,
    grad_kernel,
    grad_reference,
    problem,
    run_backend,
    run_gated_reference,
    run_reference,
    run_ssm,
    tpu_interpret_params,
)

F32 = TOL["float32"]


def _check(y, f, y_ref, f_ref, tol=F32):
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()
    assert rel_err(y, y_ref) < tol
    assert tree_rel_err(f, f_ref) < tol
    assert jax.tree.map(lambda a: a.dtype, f) == jax.tree.map(lambda a: a.dtype, f_ref)


@pytest.mark.parametrize("R,L,reset_prob", [(1, 37, 0.15), (2, 24, 0.1)])
def test_forward_matches_reference_f32(R, L, reset_prob):
    inp, st, mx = problem(L * 10 + R, L=L, R=R, reset_prob=reset_prob)
    _check(*run_ssm(inp, st, mx), *run_reference(inp, st, mx))


def test_resets_at_chunk_edges_and_first_token():
    """Resets at t = 0 (the initial state must be dropped), on a chunk boundary, twice in a row,
    on the last token, and a whole chunk of resets."""
    inp, st, mx = problem(50, L=24, R=2)
    reset = np.zeros((2, 24), bool)
    reset[0, [0, 8, 11, 12, 23]] = True
    reset[1, 16:24] = True
    inp = inp._replace(reset=jnp.asarray(reset))
    _check(*run_ssm(inp, st, mx), *run_reference(inp, st, mx))


def test_state_handover_split_equals_whole():
    """prefix (shorter than a chunk) + rest with the state handed over == one call."""
    inp, st, mx = problem(5, L=24, R=2, reset_prob=0.1)
    y, f = run_ssm(inp, st, mx)
    y1, f1 = run_ssm(time_slice(inp, 0, 5), st, mx)
    y2, f2 = run_ssm(time_slice(inp, 5), f1, mx)
    assert rel_err(jnp.concatenate([y1, y2], axis=1), y) < F32
    assert tree_rel_err(f2, f) < F32
    _, f_ref = run_reference(inp, st, mx)
    assert tree_rel_err(f2, f_ref) < F32


def test_junk_prefix_reset_away_changes_nothing():
    inp, st, mx = problem(3, L=19, R=2, init_state=False)
    y, _ = run_ssm(inp, st, mx)
    junk, _, _ = problem(4, L=5, R=2, init_state=False)
    pairs = zip(junk[:7], inp[:7], strict=True)
    cat = SSMInputs(*(jnp.concatenate([a, b], axis=1) for a, b in pairs),
                    reset=jnp.zeros((2, 24), bool).at[:, 5].set(True))
    y2, _ = run_ssm(cat, st, mx)
    assert rel_err(y2[:, 5:], y) < F32


def test_backend_gated_output_group_inputs_mimo_norm():
    """The registered backend end to end: group-level q/k with per-head biases, MIMO, D skip,
    per-head RMSNorm, gate and rank sum (in XLA after the kernel)."""
    inp, st, mx = problem(41, L=24, R=2, reset_prob=0.1, groups=1)
    z, params = epilogue(42, 2, mimo=True, norm=True, L=24)
    out, f = run_backend(inp, st, z, params, mx, backend="pallas_tpu_interpret")
    out_ref, f_ref = run_gated_reference(inp, st, z, params, mx)
    assert out.shape == inp.x.shape
    _check(out, f, out_ref, f_ref)


@pytest.mark.parametrize("R,L,tpu_interpreter", [(1, 37, False), (2, 24, True)])
def test_gradients_match_reference_f32(R, L, tpu_interpreter):
    """Forward and backward kernels under jax.grad; the MIMO case runs in Pallas' TPU-faithful
    interpreter, which also poisons uninitialized VMEM (scratch/outputs read before written)."""
    inp, st, mx = problem(11 + R, L=L, R=R, reset_prob=0.1)
    cot = jnp.asarray(np.random.default_rng(99).standard_normal((2, L, R, 3, 4)), jnp.float32)
    diff = inp._replace(reset=None)
    interpret = tpu_interpret_params() if tpu_interpreter else True
    g = grad_kernel(diff, inp.reset, st, mx, cot, interpret=interpret)
    g_ref = grad_reference(diff, inp.reset, st, mx, cot)
    leaves, ref_leaves = jax.tree.leaves(g), jax.tree.leaves(g_ref)
    assert len(leaves) == len(ref_leaves) == (12 if R > 1 else 11)
    for a, b in zip(leaves, ref_leaves, strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < GRAD_TOL["float32"]


def test_bf16_forward_and_gradients_close_to_f32_reference():
    inp, st, mx = problem(21, L=24, R=2, dtype=jnp.bfloat16, reset_prob=0.05)
    y, f = run_ssm(inp, st, mx)
    y_ref, f_ref = run_reference(f32_tree(inp), f32_tree(st), mx)
    assert y.dtype == jnp.float32 and f.h.dtype == jnp.float32
    assert f.k_prev.dtype == jnp.bfloat16 and f.x_prev.dtype == jnp.bfloat16
    assert rel_err(y, y_ref) < TOL["bfloat16"]
    assert rel_err(f.h, f_ref.h) < TOL["bfloat16"]

    cot = jnp.asarray(np.random.default_rng(98).standard_normal((2, 24, 2, 3, 4)), jnp.float32)
    diff = inp._replace(reset=None)
    g = grad_kernel(diff, inp.reset, st, mx, cot)
    g_ref = grad_reference(f32_tree(diff), inp.reset, f32_tree(st), mx, cot)
    assert g[0].q.dtype == jnp.bfloat16 and g[0].x.dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, b) < GRAD_TOL["bfloat16"]


def test_unsupported_dtype_raises_backend_unsupported():
    inp, st, mx = problem(1, L=4, R=1)
    inp = inp._replace(q=inp.q.astype(jnp.float16), k=inp.k.astype(jnp.float16),
                       x=inp.x.astype(jnp.float16))
    z, params = epilogue(2, 1, mimo=False, norm=False, L=4)
    with pytest.raises(backends.Unsupported, match="float16"):
        run_backend(inp, st, z, params, mx, backend="pallas_tpu_interpret")
