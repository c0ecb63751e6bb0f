"""The TPU decode-step kernel (interpret mode) against `ssm_step`, and prefill + decode == full."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba3_jax.ops.ssm import SSMState, ssm_step
from pallas_kernels.tpu import ssm_step_tpu
from tests.helpers import TIME_FIELDS, rel_err, time_slice, tree_rel_err
from tests.kernels_tpu.tpu_cases import TOL, epilogue, problem, run_backend, run_gated_reference

F32 = TOL["float32"]


@functools.partial(jax.jit, static_argnames=("hb",))
def _step_kernel(state, args, mimo_x, hb):
    return ssm_step_tpu(state, *args, mimo_x=mimo_x, interpret=True, heads_per_block=hb)


@jax.jit
def _step_reference(state, args, mimo_x):
    return ssm_step(state, *args, mimo_x=mimo_x)


@pytest.mark.parametrize("R,state_dtype,hb", [(1, jnp.bfloat16, 1), (2, jnp.float32, 3)])
def test_decode_step_matches_ssm_step(R, state_dtype, hb):
    inp, st, mx = problem(60 + R, L=1, R=R)
    st = st._replace(h=st.h.astype(state_dtype))
    reset = jnp.array([False, True])  # the second sequence starts a new segment here
    args = tuple(getattr(inp, f)[:, 0] for f in TIME_FIELDS[:-1]) + (reset,)
    y, new = _step_kernel(st, args, mx, hb=hb)
    y_ref, new_ref = _step_reference(st, args, mx)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert new.h.dtype == state_dtype
    assert rel_err(y, y_ref) < F32
    tol = F32 if state_dtype == jnp.float32 else 1e-2  # bf16-stored state: one rounding
    assert tree_rel_err(new, new_ref) < tol


def test_prefill_then_decode_equals_full_forward():
    """Chunked kernel over 24 tokens, then 3 decode-kernel steps through the registered step
    backend, == the reference over all 27 (gated outputs and the final state)."""
    inp, st, mx = problem(70, L=27, R=2, reset_prob=0.1, groups=1)
    inp = inp._replace(reset=inp.reset.at[:, 25].set(True))  # a segment starts mid-decode
    z, params = epilogue(71, 2, mimo=True, norm=True, L=27)
    out_ref, f_ref = run_gated_reference(inp, st, z, params, mx)

    out, state = run_backend(time_slice(inp, 0, 24), st, z[:, :24], params, mx,
                             backend="pallas_tpu_interpret")
    outs = [out]
    for t in range(24, 27):
        o, state = run_backend(time_slice(inp, t, t + 1), state, z[:, t:t + 1], params, mx,
                               backend="pallas_tpu_interpret_step")
        outs.append(o)
    assert rel_err(jnp.concatenate(outs, axis=1), out_ref) < F32
    assert tree_rel_err(state, f_ref) < F32
    assert isinstance(state, SSMState) and np.isfinite(np.asarray(state.h)).all()
