"""Chunked cross-entropy with the head's gradient formed in the forward pass: equals the plain
softmax cross-entropy and its autodiff gradients, and runs no recomputed logits matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mamba3_jax.training.loss import chunked_cross_entropy
from tests.helpers import rel_err


def _inputs(dtype, B=2, L=23, d=16, V=37):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    h = jax.random.normal(k[0], (B, L, d)).astype(dtype)
    w = jax.random.normal(k[1], (d, V)) * 0.3
    targets = jax.random.randint(k[2], (B, L), 0, V)
    mask = (jax.random.uniform(k[3], (B, L)) > 0.25).astype(jnp.float32)
    return h, w, targets, mask


def _plain(h, w, targets, mask):
    logits = jnp.einsum("bld,dv->blv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(hits * mask)


@pytest.mark.parametrize("dtype,tol,chunk", [
    (jnp.float32, 1e-5, 5),  # padded last chunk
    (jnp.float32, 1e-5, 64),  # one chunk longer than L
    (jnp.bfloat16, 2e-2, 8),
])
def test_values_and_gradients_equal_the_plain_loss(dtype, tol, chunk):
    h, w, t, m = _inputs(dtype)
    want = _plain(h, w, t, m)
    got = jax.jit(chunked_cross_entropy, static_argnums=4)(h, w, t, m, chunk)
    assert rel_err(got[0], want[0]) < 1e-5 and float(got[1]) == float(want[1])
    scale = 3.0  # a cotangent other than 1 (the NaN-injection scale)
    g_want = jax.grad(lambda h, w: scale * _plain(h, w, t, m)[0], (0, 1))(h, w)
    g_got = jax.jit(jax.grad(
        lambda h, w: scale * chunked_cross_entropy(h, w, t, m, chunk)[0], (0, 1)))(h, w)
    for a, b in zip(g_got, g_want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) < tol, rel_err(a, b)
    # masked-out tokens get no gradient
    g = np.asarray(g_got[0].astype(jnp.float32))
    assert np.abs(g * (1 - np.asarray(m))[..., None]).max() == 0.0


def _ops_on_vocab(jpr, names, V: int) -> int:
    """Equations of the primitives `names` with the vocabulary (V) in an operand's shape, at any
    nesting depth of the jaxpr."""
    n = 0
    for eqn in jpr.eqns:
        if eqn.primitive.name in names:
            n += any(V in getattr(v.aval, "shape", ()) for v in eqn.invars)
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                n += _ops_on_vocab(inner, names, V)
    return n


def test_head_matmuls_run_three_times_per_token_under_grad():
    h, w, t, m = _inputs(jnp.bfloat16, V=37)
    jaxpr = jax.make_jaxpr(jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, m, 8)[0],
                                    (0, 1)))(h, w)

    assert _ops_on_vocab(jaxpr.jaxpr, {"dot_general"}, 37) == 3  # logits, dh, dw: no recompute


def test_no_gradient_path_forms_no_gradients():
    h, w, t, m = _inputs(jnp.float32)
    jaxpr = jax.make_jaxpr(lambda h, w: chunked_cross_entropy(h, w, t, m, 8))(h, w)
    assert str(jaxpr).count("dot_general") == 1  # eval: logits only
    np.testing.assert_allclose(chunked_cross_entropy(h, w, t, m, 8)[0], _plain(h, w, t, m)[0],
                               rtol=1e-5)


def test_one_pass_over_the_logits():
    """max and sum of exponentials in one reduction; no argmax (another read of the slab)."""
    h, w, t, m = _inputs(jnp.float32, V=37)

    jaxpr = jax.make_jaxpr(lambda h, w: chunked_cross_entropy(h, w, t, m, 8))(h, w)
    reductions = {"reduce", "reduce_max", "reduce_sum", "argmax", "reduce_min"}
    assert _ops_on_vocab(jaxpr.jaxpr, reductions, 37) == 1


@pytest.mark.parametrize("scale", [1.0, 80.0])
def test_max_and_sum_exp_equal_the_two_pass_form(scale):
    """The one-pass (max, sum exp) equals max then sum(exp(x - max)), also with logits spread
    wide enough that exp(x) alone would overflow."""
    from mamba3_jax.training.loss import _max_and_sum_exp

    x = scale * jax.random.normal(jax.random.PRNGKey(4), (3, 5, 1001))
    top, total = jax.jit(_max_and_sum_exp)(x)
    np.testing.assert_array_equal(top, jnp.max(x, axis=-1))
    want = jnp.sum(jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), axis=-1)
    np.testing.assert_allclose(total, want, rtol=2e-6)


def test_max_and_sum_exp_with_infinite_logits():
    """Masked (-inf) logits add nothing, wherever they sit, and ties at the max count each
    (the combine's -inf - -inf and equal-maxima cases)."""
    from mamba3_jax.training.loss import _max_and_sum_exp

    x = jnp.array([[0.0, -jnp.inf, 1.0, -jnp.inf], [-jnp.inf, -jnp.inf, -1.0, -jnp.inf],
                   [2.0, 2.0, -jnp.inf, 2.0]])
    top, total = jax.jit(_max_and_sum_exp)(x)
    np.testing.assert_array_equal(top, [1.0, -1.0, 2.0])
    np.testing.assert_allclose(total, [1.0 + np.exp(-1.0), 1.0, 3.0], rtol=1e-6)
