"""Generation: greedy decoding agrees with the full forward pass (teacher forcing)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba3_jax.config import ModelConfig
from mamba3_jax.generate import filter_logits, generate, stream
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


def _tiny_model(vocab=64):
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layer=1, d_state=16, headdim=16,
                      chunk_size=8)
    return Mamba3LM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs, prompt, message", [
    (dict(temperature=-0.1), None, "temperature must be"),
    (dict(temperature=float("nan")), None, "temperature must be"),
    (dict(temperature=float("inf")), None, "temperature must be"),
    (dict(top_k=0), None, "top_k must be an integer >= 1"),
    (dict(top_k=65), None, "top_k=65 exceeds the vocabulary size 64"),
    (dict(top_p=0.0), None, "top_p must be in (0, 1]"),
    (dict(top_p=float("nan")), None, "top_p must be in (0, 1]"),
    (dict(prefill_chunk=0), None, "prefill_chunk must be an integer >= 1"),
    (dict(max_new_tokens=0), None, "max_new_tokens must be"),
    ({}, np.array([[1, 64]]), "token id 64, outside the vocabulary [0, 64)"),
    ({}, np.array([[-1, 3]]), "token id -1, outside the vocabulary"),
    ({}, np.zeros((1, 0), np.int32), "non-empty (batch, length)"),
    ({}, np.zeros((0, 3), np.int32), "non-empty (batch, length)"),
    ({}, np.zeros((3,), np.int32), "non-empty (batch, length)"),
    ({}, np.zeros((1, 3), np.float32), "integer token ids"),
])
def test_generate_and_stream_reject_bad_arguments(kwargs, prompt, message):
    """One-line ValueErrors before anything is traced (a bad id would index garbage)."""
    model = _tiny_model()
    prompt = np.zeros((1, 3), np.int32) if prompt is None else prompt
    args = dict(max_new_tokens=2) | kwargs
    for fn in (generate, lambda *a, **k: next(stream(*a, **k))):
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            fn(model, prompt, jax.random.PRNGKey(0), **args)
        assert "\n" not in str(e.value)


def test_filter_logits_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda p, k=None: np.isfinite(np.asarray(filter_logits(logits, k, p)))[0]  # noqa
    np.testing.assert_array_equal(kept(0.75), [False, True, False, True])  # 0.5 + 0.3 >= 0.75
    np.testing.assert_array_equal(kept(0.85), [False, True, True, True])
    np.testing.assert_array_equal(kept(1e-6), [False, True, False, False])  # top token stays
    np.testing.assert_array_equal(kept(1.0), [True, True, True, True])
    np.testing.assert_array_equal(kept(1.0, 2), [False, True, False, True])
    np.testing.assert_array_equal(kept(0.5, 3), [False, True, False, False])


def test_stream_yields_generates_tokens_and_stops_at_eos():
    """stream() decodes the same tokens as the in-jit generate() for the same key, and with an
    end-of-text id stops right after every row has produced it."""
    model = _tiny_model()
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 64)
    args = dict(max_new_tokens=6, temperature=1.0, top_k=8, top_p=0.9)
    whole = np.asarray(generate(model, prompt, jax.random.PRNGKey(4), **args))
    streamed = np.stack(list(stream(model, prompt, jax.random.PRNGKey(4), **args)), axis=1)
    np.testing.assert_array_equal(streamed, whole)
    eos = int(whole[0, 2])  # pretend row 0's third token is end-of-text
    stop = max(int(np.argmax(r == eos)) if (r == eos).any() else 6 for r in whole[:, :6])
    short = list(stream(model, prompt, jax.random.PRNGKey(4), eos_id=eos, **args))
    assert len(short) == min(stop + 1, 6)
    np.testing.assert_array_equal(np.stack(short, axis=1), whole[:, :len(short)])
