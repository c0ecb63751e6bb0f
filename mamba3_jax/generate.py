"""Text generation: prefill the prompt, then decode token by token inside one jitted scan.

Keeping the whole decode loop in one XLA program avoids a host round trip per token, which
dominates at small batch (see ENGINEERING.md).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from mamba3_jax.model import Mamba3LM


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy at temperature 0, else softmax sampling, optionally restricted to the top k."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prefill(model: Mamba3LM, prompt: jax.Array, chunk: int = 0):
    """prompt (B, L) -> (logits of the last position (B, V), cache).

    Only the last position's logits are formed (never (B, L, V)). chunk > 0 feeds the prompt in
    pieces of `chunk` tokens under `lax.scan`, handing the cache over between them, so activation
    memory is bounded by the piece rather than the prompt; the result is the same."""
    B, L = prompt.shape
    if chunk and L > chunk:
        n, rest = divmod(L, chunk)
        pieces = jnp.swapaxes(prompt[:, :n * chunk].reshape(B, n, chunk), 0, 1)
        graphdef, state = nnx.split(model)

        def body(c, piece):
            h, c = nnx.merge(graphdef, state).features(piece, cache=c)
            return c, h[:, -1]

        cache, last = jax.lax.scan(body, model.init_cache(B), pieces)
        h_last = last[-1]
        if rest:
            h, cache = model.features(prompt[:, n * chunk:], cache=cache)
            h_last = h[:, -1]
    else:
        h, cache = model.features(prompt)
        h_last = h[:, -1]
    return model.logits(h_last), cache


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "prefill_chunk"))
def generate(model: Mamba3LM, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, prefill_chunk: int = 0) -> jax.Array:
    """prompt (B, L) -> (B, max_new_tokens) new tokens.

    The prompt is prefilled with the model's scan backend (in pieces of `prefill_chunk` tokens
    if > 0); each new token is one `model.step`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    logits, cache = prefill(model, prompt, prefill_chunk)
    keys = jax.random.split(key, max_new_tokens)
    first = sample(logits, keys[0], temperature, top_k)
    graphdef, state = nnx.split(model)

    def body(carry, k):
        token, cache = carry
        lg, cache = nnx.merge(graphdef, state).step(token, cache)
        nxt = sample(lg, k, temperature, top_k)
        return (nxt, cache), token

    (last, _), tokens = jax.lax.scan(body, (first, cache), keys[1:])
    return jnp.concatenate([jnp.swapaxes(tokens, 0, 1), last[:, None]], axis=1)
