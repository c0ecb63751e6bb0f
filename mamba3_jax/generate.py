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


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k"))
def generate(model: Mamba3LM, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    """prompt (B, L) int -> (B, max_new_tokens) new tokens.

    The prompt is prefilled with the chunked form; each new token is one `model.step`.
    """
    logits, cache = model(prompt, return_cache=True)
    keys = jax.random.split(key, max_new_tokens)
    first = sample(logits[:, -1], keys[0], temperature, top_k)
    graphdef, state = nnx.split(model)

    def body(carry, k):
        token, cache = carry
        lg, cache = nnx.merge(graphdef, state).step(token, cache)
        nxt = sample(lg, k, temperature, top_k)
        return (nxt, cache), token

    (last, _), tokens = jax.lax.scan(body, (first, cache), keys[1:])
    return jnp.concatenate([jnp.swapaxes(tokens, 0, 1), last[:, None]], axis=1)
