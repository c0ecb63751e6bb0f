"""Pallas kernels of the Mamba-3 SSM, one folder (or module) per op.

  * `chunked_scan/` prefill and training: `chunked_scan(...)` with `mamba3_jax.backends.
    mixer_core`'s contract, chunk-parallel Pallas Triton kernels (forward and backward), the
    Mosaic TPU kernels, the reference, named shapes;
  * `decode_step/`   the fused single-token decode step (Pallas Triton, state updated in place;
    Mosaic TPU);
  * `tpu/`           what the TPU kernels share, their CPU lowering check and their backends.

`backend_table()` lists the backends; `mamba3_jax.backends` registers them when a Pallas backend
is first asked for. Nothing here imports the registry (imports flow one way: backends ->
pallas_kernels -> mamba3_jax.ops). Shapes a kernel cannot run raise `KernelUnsupported`, an
`mamba3_jax.errors.Unsupported`, so 'auto' falls back to XLA.

GPU backends: "pallas_gpu" (compiled; refuses off a CUDA device), "pallas_gpu_step" (decode
kernel for L == 1, the reference form otherwise; both take group-level q/k plus biases) and
their interpret-mode twins "pallas_gpu_interpret", "pallas_gpu_interpret_step" (CPU; slow, for
tests). "pallas_gpu_auto_step" is the step of `auto` on a GPU: the decode kernel, or the XLA step
where that measured faster (`decode_step.pallas_triton.MEASURED`: nowhere since session 17).
"""

from __future__ import annotations

import jax

from pallas_kernels._compat import KernelUnsupported
from pallas_kernels.chunked_scan.api import chunked_scan
from pallas_kernels.chunked_scan.pallas_triton import TritonBlocks
from pallas_kernels.chunked_scan.reference import reference as reference_core
from pallas_kernels.decode_step.pallas_triton import (
    DecodeBlocks,
    decode_step,
    default_blocks,
    xla_step_faster,
)

__all__ = ["DecodeBlocks", "KernelUnsupported", "TritonBlocks", "backend_table", "chunked_scan",
           "decode_step", "default_blocks", "on_gpu", "xla_step_faster"]


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def _chunked_backend(interpret: bool):
    def core(inp, state, *, z, D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None,
             chunk_size=64, norm_eps=1e-5):
        if not interpret and not on_gpu():
            raise KernelUnsupported("pallas_gpu needs a CUDA GPU (pallas_interpret runs on CPU)")
        return chunked_scan(inp, state, z=z, D=D, mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o,
                            norm_weight=norm_weight, chunk_size=chunk_size, norm_eps=norm_eps,
                            interpret=interpret)

    return core


def _step_backend(interpret: bool, auto: bool = False):
    """The decode kernel for L == 1, else the reference form. `auto`: also the reference form
    (the XLA step) where that measured faster than the kernel (`xla_step_faster`)."""

    def core(inp, state, *, z, D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None,
             chunk_size=64, norm_eps=1e-5):
        kw = dict(z=z, D=D, mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o,
                  norm_weight=norm_weight, chunk_size=chunk_size, norm_eps=norm_eps)
        R, N = inp.q.shape[2], inp.q.shape[-1]
        if auto and xla_step_faster(state.h.dtype, N, R):
            return reference_core(inp, state, **kw)
        try:
            if inp.x.shape[1] != 1:
                raise KernelUnsupported(
                    f"the decode kernel takes one token, got L={inp.x.shape[1]}")
            if not interpret and not on_gpu():
                raise KernelUnsupported("pallas_gpu_step needs a CUDA GPU")
            reset = None if inp.reset is None else inp.reset[:, 0]
            # group-level q, k and their per-head biases go in as they are (the kernel adds them)
            out, final = decode_step(state, inp.q[:, 0], inp.k[:, 0], inp.x[:, 0], z[:, 0],
                                     inp.angle_inc[:, 0], inp.log_decay[:, 0], inp.gamma[:, 0],
                                     inp.eta[:, 0], reset, D=D, mimo_x=mimo_x, mimo_z=mimo_z,
                                     mimo_o=mimo_o, norm_weight=norm_weight, norm_eps=norm_eps,
                                     q_bias=inp.q_bias, k_bias=inp.k_bias, interpret=interpret)
            return out[:, None], final
        except KernelUnsupported:
            return reference_core(inp, state, **kw)

    return core


def backend_table() -> dict:
    """name -> (backend, group_aware): the GPU backends, then the TPU ones."""
    table = {
        "pallas_gpu": (_chunked_backend(interpret=False), True),
        "pallas_gpu_interpret": (_chunked_backend(interpret=True), True),
        "pallas_gpu_step": (_step_backend(interpret=False), True),
        "pallas_gpu_interpret_step": (_step_backend(interpret=True), True),
        # what `backends.step_backend('auto')` picks on a GPU: kernel or XLA step, as measured
        "pallas_gpu_auto_step": (_step_backend(interpret=False, auto=True), True),
    }
    from pallas_kernels.tpu import backend_table as tpu_table

    table.update(tpu_table())
    return table
