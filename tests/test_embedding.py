"""The embedding lookup's own gradient (mamba3_jax/ops/embedding.py) against autodiff of the
plain lookup and against a float64 sum per token id; many repeated ids, as in real text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba3_jax.ops.embedding import embed_lookup

V, D = 13, 6


def _problem(seed=0, shape=(3, 40)):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    table = jax.random.normal(k1, (V, D), jnp.float32)
    # ids skewed towards a few values (long runs after sorting); V - 1 never used
    tokens = jnp.minimum(jax.random.geometric(k2, 0.3, shape) - 1, V - 2).astype(jnp.int32)
    g = jax.random.normal(k3, shape + (D,), jnp.float32)
    return table, tokens, g


@jax.jit(static_argnums=3)
def _grad(table, tokens, g, dtype):
    return jax.vjp(lambda t: embed_lookup(t, tokens, dtype), table)[1](g)[0]


def test_forward_equals_nnx_embed():
    emb = nnx.Embed(V, D, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    tokens = _problem()[1]
    got = embed_lookup(emb.embedding[...], tokens, jnp.bfloat16)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, emb(tokens).astype(jnp.float32))


def test_gradient_equals_autodiff_float32():
    table, tokens, g = _problem(1)
    got = _grad(table, tokens, g, jnp.float32)
    want = jax.vjp(lambda t: jnp.take(t, tokens, axis=0), table)[1](g)[0]
    assert got.dtype == table.dtype
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(got[V - 1]).max()) == 0.0  # an id that never occurs gets zeros


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (4, 257)])
def test_gradient_is_the_float64_sum_per_id_for_bf16_rows(shape):
    """bf16 rows: the cotangent is summed per id in float32, not in bf16 (checked against a
    float64 sum), for one token, a few, and an odd count with long runs."""
    table, tokens, g = _problem(2, shape)
    got = _grad(table, tokens, g, jnp.bfloat16)
    want = np.zeros((V, D))
    np.add.at(want, np.asarray(tokens).reshape(-1), np.asarray(g, np.float64).reshape(-1, D))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_the_backward_scatter_is_declared_unique():
    table, tokens, g = _problem(3)
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda t: jnp.sum(embed_lookup(t, tokens, jnp.bfloat16) * g)))(table))
    assert "unique_indices=True" in jaxpr and "scatter-add" in jaxpr
