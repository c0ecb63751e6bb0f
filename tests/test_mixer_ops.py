"""The mixer's pure pieces whose gradients are written by hand or shaped for XLA: the skip-gate
VJP against autodiff of the same formula, and the in_proj split against plain slices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba3_jax.config import ModelConfig
from mamba3_jax.ops.mixer import _skip_gate, gate_output, skip_gate, split_in_proj

f32 = jnp.float32


def _inputs(dtype, shape=(2, 7, 3, 5)):
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    y = jax.random.normal(ks[0], shape, f32)
    x, z = (3.0 * jax.random.normal(k, shape, f32).astype(dtype) for k in ks[1:3])
    D = jax.random.normal(ks[3], shape[-2:-1], f32)
    g = jax.random.normal(ks[4], shape, f32)
    return y, x, z, D, g


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6),
                                       # bf16 x, z: the same f32 maths; the cotangents are
                                       # rounded to bf16 on the way out by both sides
                                       (jnp.bfloat16, 1e-2)])
def test_skip_gate_vjp_equals_autodiff(dtype, tol):
    y, x, z, D, g = _inputs(dtype)
    out, vjp = jax.vjp(skip_gate, y, x, z, D)
    want, want_vjp = jax.vjp(_skip_gate, y, x, z, D)
    np.testing.assert_array_equal(out, want)
    for name, a, b in zip("yxzD", vjp(g), want_vjp(g), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = float(jnp.max(jnp.abs(a.astype(f32) - b.astype(f32))))
        scale = float(jnp.max(jnp.abs(b.astype(f32))))
        assert scale > 0 and err <= tol * scale, (name, err, scale)


def test_gate_output_siso_takes_the_custom_vjp_and_mimo_does_not():
    y, x, z, D, _ = _inputs(jnp.float32)
    y5 = y[:, :, None]  # (B, L, R=1, H, P)
    assert "custom_vjp_call" in str(jax.make_jaxpr(gate_output)(y5, x, z, D))
    mimo_x = jnp.ones((3, 2, 5))
    y2 = jnp.concatenate([y5, 2 * y5], axis=2)
    out = gate_output(y2, x, z, D, mimo_x=mimo_x, mimo_z=jnp.ones((3, 2, 5)),
                      mimo_o=jnp.full((3, 2, 5), 0.5))
    want = 0.5 * (_skip_gate(y, x, z, D) + _skip_gate(2 * y, x, z, D))
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_split_in_proj_equals_slices_and_its_gradient_is_one_concatenate():
    cfg = ModelConfig(d_model=32, n_layer=1, d_state=16, headdim=16)
    width = sum(w for _, w in cfg.in_proj_splits)
    v = jax.random.normal(jax.random.PRNGKey(1), (2, 3, width))
    parts, start = split_in_proj(v, cfg), 0
    for name, w in cfg.in_proj_splits:
        np.testing.assert_array_equal(parts[name], v[..., start:start + w])
        start += w
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda v: sum(jnp.sum(p ** 2) for p in split_in_proj(v, cfg).values())))(v))
    assert "concatenate" in jaxpr and " pad" not in jaxpr


@pytest.mark.parametrize("kw", [dict(dtype="bfloat16"), dict(dtype="float32", mimo_rank=2),
                                dict(dtype="bfloat16", d_conv=4, discretization="euler",
                                     rotation="none")])
@pytest.mark.parametrize("L, matmuls", [(5, 2), (1, 1)])
def test_in_proj_as_two_matmuls_equals_one(kw, L, matmuls):
    """The Mamba-3 layer's in_proj runs as two matmuls (the wide parts, then the per-head
    scalars and angles), one for a single token (decode: no weight slices in the step): each
    part equals that slice of the one-matmul output."""
    from flax import nnx

    from mamba3_jax.layers import Mamba3

    cfg = ModelConfig(d_model=32, n_layer=1, d_state=16, headdim=16, **kw)
    layer = Mamba3(cfg, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.PRNGKey(2), (2, L, 32))
    assert str(jax.make_jaxpr(layer._in_proj_parts)(u)).count("dot_general") == matmuls
    got, want = layer._in_proj_parts(u), split_in_proj(layer.in_proj(u), cfg)
    assert list(got) == [name for name, _ in cfg.in_proj_splits]
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_allclose(np.asarray(got[name], np.float32),
                                   np.asarray(want[name], np.float32), rtol=1e-6, atol=1e-6)
