"""Generation: greedy decoding agrees with the full forward pass (teacher forcing)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba3_jax.config import ModelConfig
from mamba3_jax.generate import generate
from mamba3_jax.model import Mamba3LM


def test_greedy_generation_matches_forward_argmax():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, d_state=16, headdim=16,
                      chunk_size=8, mimo_rank=2)
    model = Mamba3LM(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, 64)
    new = generate(model, prompt, jax.random.PRNGKey(2), max_new_tokens=9)
    assert new.shape == (2, 9) and new.dtype == jnp.int32
    full = jnp.concatenate([prompt, new], axis=1)
    logits = nnx.jit(lambda m, t: m(t))(model, full)
    # every generated token is the argmax of the forward pass at the position before it
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 10:-1], -1)), np.asarray(new))


def test_sampling_respects_top_k_and_seed():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=1, d_state=16, headdim=16,
                      chunk_size=8)
    model = Mamba3LM(cfg, rngs=nnx.Rngs(0))
    prompt = jnp.zeros((3, 4), jnp.int32)
    a = generate(model, prompt, jax.random.PRNGKey(5), max_new_tokens=6, temperature=1.0,
                 top_k=1)
    greedy = generate(model, prompt, jax.random.PRNGKey(6), max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(greedy))  # top-1 sampling = greedy
    b = generate(model, prompt, jax.random.PRNGKey(7), max_new_tokens=6, temperature=1.0)
    c = generate(model, prompt, jax.random.PRNGKey(7), max_new_tokens=6, temperature=1.0)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
    assert int(b.min()) >= 0 and int(b.max()) < 64


def test_bf16_decode_state_keeps_its_dtype_and_tracks_the_forward():
    """state_dtype=bfloat16: every decode step stores the state back in bf16 (a scan over steps
    needs a fixed carry type), for both mixers, and greedy decoding still follows the forward."""
    for extra in ({}, {"mixer": "mamba2", "d_conv": 4, "rotation": "none"}):
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, d_state=16, headdim=16,
                          chunk_size=8, state_dtype="bfloat16", **extra)
        model = Mamba3LM(cfg, rngs=nnx.Rngs(0))
        prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 64)
        _, cache = nnx.jit(lambda m, t: m(t, return_cache=True))(model, prompt)
        _, stepped = nnx.jit(lambda m, t, c: m.step(t, c))(model, prompt[:, -1], cache)
        for before, after in zip(jax.tree.leaves(cache), jax.tree.leaves(stepped), strict=True):
            assert before.dtype == after.dtype and before.shape == after.shape
        assert {c.ssm.h.dtype for c in cache} == {jnp.dtype("bfloat16")}
    # the decode loop of the last (Mamba-2) model runs under lax.scan
    new = generate(model, prompt, jax.random.PRNGKey(2), max_new_tokens=5)
    logits = nnx.jit(lambda m, t: m(t))(model, jnp.concatenate([prompt, new], axis=1))
    agree = np.mean(np.asarray(jnp.argmax(logits[:, 6:-1], -1)) == np.asarray(new))
    assert agree >= 0.8, agree


def test_prefill_in_pieces_equals_whole_prompt():
    """Prefill in scanned pieces (with a shorter last piece) hands the cache over exactly: the
    last logits and the cache equal a one-shot prefill, and generate's first token follows."""
    from mamba3_jax.generate import prefill as eager_prefill

    prefill = nnx.jit(eager_prefill, static_argnums=2)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, d_state=16, headdim=16,
                      chunk_size=8, mimo_rank=2)
    model = Mamba3LM(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.PRNGKey(3), (2, 23), 0, 64)
    whole_logits, whole_cache = prefill(model, prompt, 0)
    full = nnx.jit(lambda m, t: m(t))(model, prompt)
    np.testing.assert_allclose(whole_logits, full[:, -1], rtol=1e-5, atol=1e-5)
    for chunk in (5, 8):  # 23 = 4 x 5 + 3 and 2 x 8 + 7
        logits, cache = prefill(model, prompt, chunk)
        np.testing.assert_allclose(logits, whole_logits, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(whole_cache), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    first = generate(model, prompt, jax.random.PRNGKey(4), max_new_tokens=1, prefill_chunk=5)
    np.testing.assert_array_equal(first[:, 0], jnp.argmax(whole_logits, -1))
