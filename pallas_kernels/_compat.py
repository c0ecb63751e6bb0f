"""Shims over the Pallas API: the kernels run on jax 0.10.x (CPU, interpret) and 0.11.x (GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba3_jax.errors import Unsupported

try:  # the Triton flavour of Pallas (deprecated since jax 0.11, still the CUDA default)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old/new jax
    plgpu = None

f32 = jnp.float32


class KernelUnsupported(Unsupported):
    """A shape/config a kernel cannot run ('auto' then falls back to XLA)."""


#: marker for a block dimension that is squeezed out of the kernel's ref
SQ = getattr(pl, "squeezed", None)


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters under whichever name this jax has (None if neither)."""
    if plgpu is None:
        return None
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if cls is None:  # pragma: no cover
        return None
    return cls(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype, interpret: bool, f32_mode: str = "tf32x3"):
    """Precision argument for in-kernel dots.

    bf16/f16 operands: default (tensor cores, f32 accumulation). f32 operands: exact in
    interpret mode (CPU, HIGHEST); on the GPU `f32_mode` picks 'ieee' (exact FMA, slow),
    'tf32x3' (three tf32 products, ~1e-6 relative) or 'tf32' (one product, ~1e-3).
    """
    if jnp.dtype(dtype) != jnp.float32:
        return None
    if interpret or f32_mode == "ieee":
        return jax.lax.Precision.HIGHEST
    if f32_mode == "tf32x3":
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    if f32_mode == "tf32":
        return jax.lax.Precision.DEFAULT
    raise ValueError(f"unknown f32_mode {f32_mode!r}")


def dot(a, b, *, ta: bool = False, tb: bool = False, precision=None):
    """a @ b with optional transposes (as contraction dims), accumulated in float32."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def swap_pairs(u):
    """(..., N) -> u with adjacent channels (2i, 2i+1) swapped (register shuffle, no gather)."""
    shape = u.shape
    u3 = u.reshape(shape[:-1] + (shape[-1] // 2, 2))
    a, b = jnp.split(u3, 2, axis=-1)
    return jnp.concatenate([b, a], axis=-1).reshape(shape)


def pair_sum(u):
    """(..., N) -> (..., N/2): u[..., 2i] + u[..., 2i+1]."""
    shape = u.shape
    return jnp.sum(u.reshape(shape[:-1] + (shape[-1] // 2, 2)), axis=-1)


def take_prefix(u, size: int):
    """First `size` columns of u (..., M) where M / size is a power of two (equal splits)."""
    m = u.shape[-1]
    if size == m:
        return u
    return jnp.split(u, m // size, axis=-1)[0]


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0
