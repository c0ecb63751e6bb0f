"""Shims over the Pallas API: the kernels run on jax 0.10.x (CPU, interpret) and 0.11.x (GPU)."""

from __future__ import annotations

import math

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


# 2 pi in two parts for the range reduction of `sincos` (Cody-Waite): the high part has 8
# significant bits, so k * hi is exact in float32 for |k| < 2^15 and theta - k * hi loses nothing.
_TWO_PI_HI = 6.28125
_TWO_PI_LO = 2.0 * math.pi - 6.28125


def reduce_angle(theta):
    """theta - 2 pi round(theta / 2 pi), in [-pi, pi] (the product by 2 pi in two exact steps:
    float32 keeps ~1e-7 relative accuracy for angles of thousands of turns)."""
    k = jnp.floor(theta * (1.0 / (2.0 * math.pi)) + 0.5)
    return (theta - k * _TWO_PI_HI) - k * _TWO_PI_LO


def sincos(theta, fast: bool = False, interpret: bool = False):
    """(cos theta, sin theta) of a float32 tile inside a kernel.

    fast: theta reduced to [-pi, pi] (theta - 2 pi round(theta / 2 pi), in two exact steps),
    then the GPU's MUFU approximations `cos.approx.f32` / `sin.approx.f32` (absolute error
    ~1e-6 on [-pi, pi]; a few instructions where libdevice's accurate sinf / cosf take dozens,
    integer range reduction included). In interpret mode (CPU) the same reduction feeds jnp's
    exact sin / cos, so only the last ~1e-6 differs from the GPU."""
    if not fast:
        return jnp.cos(theta), jnp.sin(theta)
    r = reduce_angle(theta)
    if interpret or plgpu is None:
        return jnp.cos(r), jnp.sin(r)
    like = [jax.ShapeDtypeStruct(r.shape, r.dtype)]
    # one asm statement per result: Pallas Triton's lowering of a multi-result statement
    # returns one value (jax 0.10)
    cos, sin = (plgpu.elementwise_inline_asm(f"{op}.approx.f32 $0, $1;", args=[r],
                                             constraints="=f,f", pack=1,
                                             result_shape_dtypes=like)[0]
                for op in ("cos", "sin"))
    return cos, sin


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


#: the training mesh's batch axes (`mamba3_jax.training.mesh.BATCH_AXES`)
BATCH_AXES = ("data", "fsdp")


def batch_parallel(fn, batched, batch_axes=BATCH_AXES):
    """fn, run per device on its batch shard when a mesh is set (`jax.set_mesh`, as the
    trainer does): Pallas kernels are opaque custom calls, which XLA's partitioner would
    otherwise gather onto every device (each device then computing the whole batch).

    batched: per positional argument of fn, whether its arrays lead with the batch axis (else
    they are replicated); every output of fn leads with it. With no mesh, or no batch axis of
    size > 1 in it, fn itself."""
    mesh = jax.sharding.get_abstract_mesh()
    manual = set() if mesh.empty else set(getattr(mesh, "manual_axes", ()))
    axes = tuple(a for a in batch_axes  # axes already manual: fn sees its shard already
                 if not mesh.empty and a in mesh.axis_names and mesh.shape[a] > 1
                 and a not in manual)
    if not axes:
        return fn
    n = math.prod(mesh.shape[a] for a in axes)
    spec = jax.sharding.PartitionSpec(axes)
    explicit = any(dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[a]
                   == jax.sharding.AxisType.Explicit for a in axes)

    def call(*args):
        leaves = [x for a, b in zip(args, batched, strict=True) if b for x in jax.tree.leaves(a)]
        B = leaves[0].shape[0]
        if B % n:
            raise KernelUnsupported(f"batch {B} is not divisible by the {n} devices of mesh "
                                    f"axes {axes}")
        specs = tuple(jax.tree.map(lambda _, b=b: spec if b else jax.sharding.PartitionSpec(), a)
                      for a, b in zip(args, batched, strict=True))
        if explicit:  # the operands must already carry the batch sharding
            args = tuple(jax.tree.map(lambda x, s: jax.sharding.reshard(x, s), a, s)
                         for a, s in zip(args, specs, strict=True))
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec,
                             check_vma=False)(*args)

    return call
