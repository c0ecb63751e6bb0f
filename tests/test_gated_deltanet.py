"""Gated DeltaNet (mixer="gated_deltanet", the paper's baseline): the token loop is the published
recurrence; the chunked form equals the token loop (outputs, final state and gradients; odd
lengths, several chunk sizes, packed resets, a carried state); eigenvalues reach -1 with
negative_eigenvalues; the layer's packed rows == separate sequences; prefill + decode == forward;
scanned layers; exact parameter count; configs and the converter's refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba3_jax.baselines.gated_deltanet import DeltaCache, GatedDeltaNet
from mamba3_jax.config import ModelConfig
from mamba3_jax.convert import ConversionError, official_config
from mamba3_jax.generate import generate, prefill
from mamba3_jax.model import Mamba3LM, count_params
from mamba3_jax.ops.delta import (
    delta_chunked,
    delta_reference,
    delta_step,
    l2_normalize,
    unit_lower_inverse,
)
from tests.helpers import rel_err


def problem(seed, B=2, L=13, H=2, N=8, P=4, reset_prob=0.0):
    """Unit q/k, decays in (0, 1), beta in (0, 2), a random starting state."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = l2_normalize(jax.random.normal(ks[0], (B, L, H, N)))
    k = l2_normalize(jax.random.normal(ks[1], (B, L, H, N)))
    v = jax.random.normal(ks[2], (B, L, H, P))
    log_decay = -jax.nn.softplus(jax.random.normal(ks[3], (B, L, H)) - 1.0)
    beta = 2.0 * jax.nn.sigmoid(jax.random.normal(ks[4], (B, L, H)))
    S0 = jax.random.normal(ks[5], (B, H, P, N))
    reset = (jax.random.uniform(ks[6], (B, L)) < reset_prob) if reset_prob else None
    return q, k, v, log_decay, beta, S0, reset


def test_reference_is_the_published_recurrence():
    """S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, y_t = S_t q_t, the state
    zeroed where a document starts, written out in float64 matrices."""
    q, k, v, ld, beta, S0, reset = problem(0, reset_prob=0.2)
    y, S = delta_reference(q, k, v, ld, beta, S0, reset)
    q, k, v, ld, beta, S0, reset = map(lambda a: np.asarray(a, np.float64),
                                       (q, k, v, ld, beta, S0, reset))
    B, L, H, N = q.shape
    want = np.zeros(v.shape)
    for b in range(B):
        for h in range(H):
            s = S0[b, h]
            for t in range(L):
                if reset[b, t]:
                    s = np.zeros_like(s)
                kt = k[b, t, h][:, None]
                s = (np.exp(ld[b, t, h]) * s @ (np.eye(N) - beta[b, t, h] * kt @ kt.T)
                     + beta[b, t, h] * v[b, t, h][:, None] @ kt.T)
                want[b, t, h] = s @ q[b, t, h]
            np.testing.assert_allclose(np.asarray(S[b, h]), s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_beta_two_reflects_the_state_along_the_key():
    """alpha = 1, beta = 2, v = 0: the transition I - 2 k k^T has eigenvalue -1 along k (the
    state-tracking variant's [-1, 1] range), 1 across it."""
    q, k, v, _, _, S0, _ = problem(1, L=1)
    one = jnp.ones(k.shape[:1] + k.shape[2:3])
    _, S1 = delta_step(S0, q[:, 0], k[:, 0], jnp.zeros_like(v[:, 0]), 0 * one, 2 * one)
    Sk = jnp.einsum("bhpn,bhn->bhp", S0, k[:, 0])
    np.testing.assert_allclose(jnp.einsum("bhpn,bhn->bhp", S1, k[:, 0]), -Sk, atol=1e-5)


def test_unit_lower_inverse():
    """(I + A)^{-1} by doubling, any size (padded to a power of two); with beta = 2 and equal
    keys (A = 2 below the diagonal) the inverse stays small although the powers of A explode."""
    inverse = jax.jit(lambda a: unit_lower_inverse(a, jax.lax.Precision.HIGHEST))
    for C in (1, 5, 8):
        A = np.tril(np.random.default_rng(C).standard_normal((2, C, C)), -1) * 0.5
        T = inverse(jnp.asarray(A, jnp.float32))
        np.testing.assert_allclose(T, np.linalg.inv(np.eye(C) + A), rtol=1e-5, atol=1e-5)
    A = 2.0 * jnp.tril(jnp.ones((64, 64)), -1)
    T = inverse(A)
    np.testing.assert_allclose(T @ (jnp.eye(64) + A), jnp.eye(64), atol=1e-6)
    assert float(jnp.abs(T).max()) == 2.0


@pytest.mark.parametrize("L, C, reset_prob", [(13, 4, 0.0), (37, 8, 0.15), (5, 8, 0.3)])
def test_chunked_equals_reference_forward_and_gradients(L, C, reset_prob):
    args = problem(L, L=L, reset_prob=reset_prob)
    w_y = jax.random.normal(jax.random.PRNGKey(9), args[2].shape)
    w_s = jax.random.normal(jax.random.PRNGKey(10), args[5].shape)

    def run(fn):
        def loss(*diff):
            y, S = fn(*diff, args[6], chunk_size=C)
            return jnp.sum(y * w_y) + jnp.sum(S * w_s), (y, S)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(*args[:6])

    g_ref, (y_ref, S_ref) = run(delta_reference)
    g, (y, S) = run(delta_chunked)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5
    for name, a, b in zip(("q", "k", "v", "log_decay", "beta", "state"), g, g_ref, strict=True):
        assert rel_err(a, b) < 1e-4, name


CFG = ModelConfig(vocab_size=40, d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=8,
                  mixer="gated_deltanet", d_conv=4, negative_eigenvalues=True, d_mlp=64,
                  mlp_multiple_of=32)
TOKS = jax.random.randint(jax.random.PRNGKey(2), (1, 15), 0, CFG.vocab_size)
forward = nnx.jit(lambda m, t, s, backend=None: m(t, segment_ids=s, backend=backend),
                  static_argnames="backend")


def test_parameter_count_and_layout():
    model = Mamba3LM(CFG, rngs=nnx.Rngs(0))
    assert isinstance(model.layers[0].mixer, GatedDeltaNet)
    assert count_params(model) == CFG.num_params()
    H = CFG.nheads  # in_proj: gate, v (H P each), k, q (H N each), decay input, beta (H each)
    assert CFG.d_in_proj == 2 * H * 16 + 2 * H * 16 + 2 * H
    assert CFG.replace(d_conv=0).num_params() < CFG.num_params()
    assert count_params(Mamba3LM(CFG.replace(d_conv=0), rngs=nnx.Rngs(0))) == \
        CFG.replace(d_conv=0).num_params()


def test_chunked_model_equals_reference_and_packed_rows_equal_separate_sequences():
    model = Mamba3LM(CFG, rngs=nnx.Rngs(1))
    seg = jnp.asarray([[1] * 6 + [2] * 9])
    packed = forward(model, TOKS, seg)
    assert rel_err(packed, forward(model, TOKS, seg, "reference")) < 1e-5
    assert rel_err(packed[:, :6], forward(model, TOKS[:, :6], None)) < 1e-5
    assert rel_err(packed[:, 6:], forward(model, TOKS[:, 6:], None)) < 1e-5


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_then_decode_equals_forward(scan_layers):
    model = Mamba3LM(CFG.replace(scan_layers=scan_layers), rngs=nnx.Rngs(1))
    full = forward(model, TOKS, None)
    logits, cache = nnx.jit(lambda m, t: prefill(m, t, 4))(model, TOKS[:, :10])  # 3 pieces
    one = cache if scan_layers else cache[0]
    assert isinstance(one, DeltaCache) and one.conv.shape[-2] == CFG.d_conv - 1
    assert rel_err(logits, full[:, 9]) < 1e-5
    step = nnx.jit(lambda m, t, c: m.step(t, c))
    for t in range(10, 15):
        logits, cache = step(model, TOKS[:, t], cache)
        assert rel_err(logits, full[:, t]) < 1e-5, t
    out = generate(model, TOKS[:, :4], jax.random.PRNGKey(0), max_new_tokens=3)
    assert out.shape == (1, 3)


def test_configs_and_conversion_refused():
    with pytest.raises(ValueError, match="SISO"):
        CFG.replace(mimo_rank=2)
    with pytest.raises(ValueError, match="negative_eigenvalues"):
        CFG.replace(negative_eigenvalues=1)
    with pytest.raises(ConversionError, match="Gated DeltaNet"):
        official_config(CFG.replace(d_mlp=128, mlp_multiple_of=128))


def test_paper_gdn_configs_match_the_mamba_sizes():
    """configs/paper.py:<size>_gdn: the SISO model's parameter count (0.1%) and state size."""
    import importlib.util

    from mamba3_jax.training.config import model_config, validate

    spec = importlib.util.spec_from_file_location("paper_cfg", "configs/paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for size in mod.SIZES:
        c = mod.get_config(f"{size}_gdn")
        validate(c)
        gdn, siso = model_config(c, 100277), model_config(mod.get_config(size), 100277)
        assert gdn.mixer == "gated_deltanet" and not gdn.negative_eigenvalues
        assert abs(gdn.num_params() / siso.num_params() - 1) < 0.001, size
        assert gdn.nheads * gdn.headdim * gdn.d_state == siso.nheads * siso.headdim * 128
