"""Matmuls with float32 accumulation on low-precision operands, on every backend.

XLA:CPU (jax 0.10) cannot execute some bf16 x bf16 -> f32 dots (`UNIMPLEMENTED: Unsupported
element type for DotThunk::Execute`; e.g. the LM head's weight gradient in a bf16 train step), so
on the CPU the operands are cast to float32 first. Products of two bf16 numbers are exact in
float32, so the result is the same sums of the same products as the bf16 dot with float32
accumulation; on GPUs and TPUs the operands stay as given (tensor-core inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def einsum_f32(spec: str, a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """jnp.einsum(spec, a, b) accumulated and returned in float32."""
    if jax.default_backend() == "cpu" and jnp.float32 not in (a.dtype, b.dtype):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)
