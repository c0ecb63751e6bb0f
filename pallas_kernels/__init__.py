"""Pallas kernels for the Mamba-3 SSM, registered as scan backends of `mamba3_jax.backends`.

Backends (same signature as `mamba3_jax.backends.mixer_core`'s implementations):
  * "pallas_gpu": Pallas Triton kernels on an NVIDIA GPU (chunked forward, backward through
    `jax.custom_vjp`); "pallas_gpu_step": the fused single-token decode kernel (L == 1).
  * "pallas_gpu_interpret", "pallas_gpu_interpret_step": the same kernels with interpret=True
    (CPU; slow, for tests).
Shapes a kernel cannot run raise `backends.Unsupported` (so 'auto' falls back to XLA 'chunked').
TPU kernels, if any, live in `pallas_kernels.tpu` and register themselves.
"""

from __future__ import annotations

import jax

from mamba3_jax import backends
from pallas_kernels.chunked import BlockSizes, KernelUnsupported, chunked_core
from pallas_kernels.decode import decode_step

__all__ = ["BlockSizes", "KernelUnsupported", "chunked_core", "decode_step", "on_gpu"]


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def _chunked_backend(interpret: bool):
    def core(inp, state, *, z, D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None,
             chunk_size=64, norm_eps=1e-5):
        if not interpret and not on_gpu():
            raise backends.Unsupported("pallas_gpu needs a CUDA GPU (pallas_interpret runs on CPU)")
        return chunked_core(inp, state, z=z, D=D, mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o,
                            norm_weight=norm_weight, chunk_size=chunk_size, norm_eps=norm_eps,
                            interpret=interpret)

    return core


def _step_backend(interpret: bool):
    def core(inp, state, *, z, D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None,
             chunk_size=64, norm_eps=1e-5):
        try:
            if inp.x.shape[1] != 1:
                raise backends.Unsupported(
                    f"the decode kernel takes one token, got L={inp.x.shape[1]}")
            if not interpret and not on_gpu():
                raise backends.Unsupported("pallas_gpu_step needs a CUDA GPU")
            reset = None if inp.reset is None else inp.reset[:, 0]
            out, final = decode_step(state, inp.q[:, 0], inp.k[:, 0], inp.x[:, 0], z[:, 0],
                                     inp.angle_inc[:, 0], inp.log_decay[:, 0], inp.gamma[:, 0],
                                     inp.eta[:, 0], reset, D=D, mimo_x=mimo_x, mimo_z=mimo_z,
                                     mimo_o=mimo_o, norm_weight=norm_weight, norm_eps=norm_eps,
                                     interpret=interpret)
            return out[:, None], final
        except backends.Unsupported:
            return backends.BACKENDS["reference"](
                inp, state, z=z, D=D, mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o,
                norm_weight=norm_weight, chunk_size=chunk_size, norm_eps=norm_eps)

    return core


def _register(name, fn, group_aware):
    try:
        backends.register(name, fn, group_aware=group_aware)
    except TypeError:  # a registry without group-level inputs: per-head q, k only
        backends.register(name, fn)


_register("pallas_gpu", _chunked_backend(interpret=False), group_aware=True)
_register("pallas_gpu_interpret", _chunked_backend(interpret=True), group_aware=True)
_register("pallas_gpu_step", _step_backend(interpret=False), group_aware=False)
_register("pallas_gpu_interpret_step", _step_backend(interpret=True), group_aware=False)

try:  # the TPU (Mosaic) kernels live in pallas_kernels.tpu and register themselves
    from pallas_kernels.tpu import register_tpu_backends
except ImportError:  # pragma: no cover - optional
    register_tpu_backends = None
if register_tpu_backends is not None:
    register_tpu_backends()
