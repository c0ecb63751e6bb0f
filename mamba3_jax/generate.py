"""Text generation: prefill the prompt, then decode token by token.

`generate` keeps the whole decode loop in one jitted scan (no host round trip per token, which
dominates at small batch; see ENGINEERING.md); `stream` yields each token as it is decoded (same
tokens for the same key) and can stop at end-of-text. Both check their arguments first and raise
ValueError with one line naming the bad one. The command line is `python -m mamba3_jax.generate`
(mamba3_jax/generate_cli.py); `mamba3_jax.load.load_model` loads a trained run.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba3_jax.model import Mamba3LM


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: Optional[int],
                   top_p: float, prefill_chunk: Optional[int],
                   vocab_size: Optional[int] = None) -> None:
    """Raise ValueError (one line) on the first bad sampling argument."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature!r}")
    if top_k is not None:
        if not is_int(top_k) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1 (unset = no top-k), got {top_k!r}")
        if vocab_size is not None and top_k > vocab_size:
            raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab_size}")
    if not is_real(top_p) or not 0 < top_p <= 1:  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p!r}")
    if prefill_chunk is not None and (not is_int(prefill_chunk) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be an integer >= 1 (unset = the whole prompt at "
                         f"once), got {prefill_chunk!r}")


def check_prompt(prompt, vocab_size: int) -> None:
    """Raise ValueError (one line) unless prompt is a non-empty (B, L) integer array of ids in
    [0, vocab_size). The id range is checked whenever the values are known (not under jit)."""
    shape = np.shape(prompt)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"prompt must be a non-empty (batch, length) array of token ids, got "
                         f"shape {shape}")
    if not jnp.issubdtype(jnp.result_type(prompt), jnp.integer):
        raise ValueError(f"prompt must hold integer token ids, got dtype "
                         f"{jnp.result_type(prompt)}")
    try:
        ids = np.asarray(prompt)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: the values are not known here
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"prompt holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_cache_room(cfg, prompt_len: int, max_new_tokens: int) -> None:
    """Raise ValueError (one line) when a model with attention layers has too few KV-cache
    slots (`max_seq_len`) for the prompt and the new tokens; recurrent layers have no limit."""
    has_attention = any(cfg.layer_mixer(i) == "attention" for i in range(cfg.n_layer))
    if has_attention and prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} "
                         f"exceeds the KV cache (max_seq_len = {cfg.max_seq_len})")


def filter_logits(logits: jax.Array, top_k: Optional[int], top_p: float) -> jax.Array:
    """Set to -inf every logit outside the top k, then outside the smallest set of most likely
    tokens whose probability reaches top_p (the most likely token always stays)."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # 0 for the top token
        cutoff = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: Optional[int] = None,
           top_p: float = 1.0) -> jax.Array:
    """Greedy at temperature 0, else softmax sampling at that temperature, optionally restricted
    to the top k and to the top_p nucleus."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k, top_p)
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


def _checked(model: Mamba3LM, prompt, max_new_tokens, temperature, top_k, top_p,
             prefill_chunk) -> dict:
    """Validate everything, then the static arguments of the jitted functions."""
    vocab = model.cfg.vocab_size
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, prefill_chunk=prefill_chunk, vocab_size=vocab)
    check_prompt(prompt, vocab)
    check_cache_room(model.cfg, np.shape(prompt)[1], max_new_tokens)
    return dict(temperature=float(temperature), top_k=None if top_k is None else int(top_k),
                top_p=float(top_p))


def generate(model: Mamba3LM, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
             prefill_chunk: Optional[int] = None) -> jax.Array:
    """prompt (B, L) -> (B, max_new_tokens) new tokens, decoded in one jitted scan.

    The prompt is prefilled with the model's scan backend (in pieces of `prefill_chunk` tokens
    when given); each new token is one `model.step`. Raises ValueError on bad arguments."""
    static = _checked(model, prompt, max_new_tokens, temperature, top_k, top_p, prefill_chunk)
    return _generate(model, jnp.asarray(prompt), key, max_new_tokens=int(max_new_tokens),
                     prefill_chunk=int(prefill_chunk or 0), **static)


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p",
                                   "prefill_chunk"))
def _generate(model, prompt, key, *, max_new_tokens, temperature, top_k, top_p, prefill_chunk):
    logits, cache = prefill(model, prompt, prefill_chunk)
    keys = jax.random.split(key, max_new_tokens)
    first = sample(logits, keys[0], temperature, top_k, top_p)
    graphdef, state = nnx.split(model)

    def body(carry, k):
        token, cache = carry
        lg, cache = nnx.merge(graphdef, state).step(token, cache)
        nxt = sample(lg, k, temperature, top_k, top_p)
        return (nxt, cache), token

    (last, _), tokens = jax.lax.scan(body, (first, cache), keys[1:])
    return jnp.concatenate([jnp.swapaxes(tokens, 0, 1), last[:, None]], axis=1)


def stream(model: Mamba3LM, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
           temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
           prefill_chunk: Optional[int] = None,
           eos_id: Optional[int] = None) -> Iterator[np.ndarray]:
    """Yield the new tokens one position at a time ((B,) int32 numpy arrays) as they are
    decoded: the same tokens as `generate` with the same key. With `eos_id`, stops after the
    position at which every row has produced it. Arguments are checked before anything runs."""
    static = _checked(model, prompt, max_new_tokens, temperature, top_k, top_p, prefill_chunk)
    keys = jax.random.split(key, max_new_tokens)  # the schedule `generate` uses
    token, cache = _stream_first(model, jnp.asarray(prompt), keys[0],
                                 chunk=int(prefill_chunk or 0), **static)
    done = None
    for i in range(max_new_tokens):
        if i:
            token, cache = _stream_next(model, token, cache, keys[i], **static)
        out = np.asarray(token)
        yield out
        if eos_id is not None:
            done = (out == eos_id) if done is None else done | (out == eos_id)
            if done.all():
                return


@partial(nnx.jit, static_argnames=("chunk", "temperature", "top_k", "top_p"))
def _stream_first(model, prompt, key, *, chunk, temperature, top_k, top_p):
    logits, cache = prefill(model, prompt, chunk)
    return sample(logits, key, temperature, top_k, top_p), cache


@partial(nnx.jit, static_argnames=("temperature", "top_k", "top_p"), donate_argnames=("cache",))
def _stream_next(model, token, cache, key, *, temperature, top_k, top_p):
    logits, cache = model.step(token, cache)
    return sample(logits, key, temperature, top_k, top_p), cache


if __name__ == "__main__":  # python -m mamba3_jax.generate: the command line
    import sys

    from mamba3_jax.generate_cli import main

    sys.exit(main())
