"""Token embedding lookup with a gradient that needs no scatter of duplicate indices.

The gradient of `table[tokens]` is a scatter-add of one row per token into the table. With
`--xla_gpu_deterministic_ops` (the trainer's default, for exact resume) XLA makes a scatter with
possibly repeated indices deterministic by flattening it to scalars and sorting them all
(B * L * d elements: 50M on the 180M step, ~25-65 ms a step on an H200) and sums the rows in
the table's dtype. Here the backward sorts only the B * L token ids, sums each run of equal ids
with a segmented scan in float32 (a fixed order, so deterministic) and writes one row per
distinct id, a scatter XLA knows has unique indices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

f32 = jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """table (V, d), int tokens (...) -> rows (..., d) rounded to `dtype`, returned in float32
    (the residual stream's dtype); the gradient reaches the table in its own dtype."""
    return jnp.take(table, tokens, axis=0).astype(dtype).astype(f32)  # as nnx.Embed


def _lookup_fwd(table, tokens, dtype):
    return embed_lookup(table, tokens, dtype), (table, tokens)


def _run_sums(values: jax.Array, starts: jax.Array) -> jax.Array:
    """Running sums of values (n, d) that restart where starts (n,) is true."""
    def combine(a, b):
        (start_a, sum_a), (start_b, sum_b) = a, b
        return start_a | start_b, jnp.where(start_b[:, None], sum_b, sum_a + sum_b)
    return jax.lax.associative_scan(combine, (starts, values))[1]


def _lookup_bwd(dtype, res, g):
    table, tokens = res
    V, d = table.shape
    ids = tokens.reshape(-1)
    order = jnp.argsort(ids, stable=True)
    ids = ids[order]
    rows = g.reshape(-1, d).astype(f32)[order]
    new = ids[1:] != ids[:-1]
    sums = _run_sums(rows, jnp.concatenate([jnp.ones((1,), bool), new]))
    last = jnp.concatenate([new, jnp.ones((1,), bool)])  # the run's total sits on its last row
    # other rows go to distinct out-of-range indices (dropped), so every index is unique
    where = jnp.where(last, ids, V + jnp.arange(ids.shape[0], dtype=ids.dtype))
    dtable = jnp.zeros((V, d), f32).at[where].add(sums, mode="drop", unique_indices=True)
    return dtable.astype(table.dtype), None


embed_lookup.defvjp(_lookup_fwd, _lookup_bwd)
