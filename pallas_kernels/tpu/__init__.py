"""Pallas Mosaic TPU kernels of the Mamba-3 SSM: chunked forward/backward and a decode step.

`register_tpu_backends()` adds four backends to `mamba3_jax.backends` (mixer_core's signature):
  * "pallas_tpu": chunked forward + backward kernels compiled for a TPU;
  * "pallas_tpu_step": the single-token decode kernel (L == 1; `backends.step_backend`);
  * "pallas_tpu_interpret", "pallas_tpu_interpret_step": the same kernels in Pallas interpret
    mode (any platform; slow, for tests).
Shapes the kernels cannot run raise `backends.Unsupported` ('auto' then falls back to XLA).
See docs/kernels.md, section "TPU kernels".
"""

from __future__ import annotations

import jax

from pallas_kernels.tpu._common import KernelUnsupported
from pallas_kernels.tpu.chunked import BlockSizes, chunked_core_tpu, ssm_rows_tpu
from pallas_kernels.tpu.decode import decode_core_tpu, ssm_step_tpu

__all__ = [
    "BlockSizes",
    "KernelUnsupported",
    "chunked_core_tpu",
    "decode_core_tpu",
    "make_backend",
    "on_tpu",
    "register_tpu_backends",
    "ssm_rows_tpu",
    "ssm_step_tpu",
]


def on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def make_backend(interpret: bool, *, step: bool = False, blocks: BlockSizes | None = None):
    """A `mamba3_jax.backends` backend on the TPU kernels.

    KernelUnsupported becomes `backends.Unsupported`; the compiled (non-interpret) backends
    refuse to run off a TPU. The step backend falls back to the reference form when the decode
    kernel cannot take the call (e.g. L > 1), like the GPU step backend.
    """
    from mamba3_jax import backends

    name = "pallas_tpu" + ("_interpret" if interpret else "") + ("_step" if step else "")

    def backend(inp, state, *, z, D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None,
                chunk_size=64, norm_eps=1e-5):
        kw = dict(z=z, D=D, mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o,
                  norm_weight=norm_weight, chunk_size=chunk_size, norm_eps=norm_eps)
        try:
            if not interpret and not on_tpu():
                raise KernelUnsupported(f"{name} needs a TPU (pallas_tpu_interpret runs anywhere)")
            if step:
                return decode_core_tpu(inp, state, interpret=interpret, **kw)
            return chunked_core_tpu(inp, state, interpret=interpret, blocks=blocks, **kw)
        except KernelUnsupported as e:
            if step:
                return backends.BACKENDS["reference"](inp, state, **kw)
            raise backends.Unsupported(str(e)) from e

    backend.__name__ = name
    return backend


def register_tpu_backends() -> None:
    """Register the four TPU backends with `mamba3_jax.backends` (idempotent)."""
    from mamba3_jax import backends

    for interpret in (False, True):
        for step in (False, True):
            fn = make_backend(interpret, step=step)
            backends.register(fn.__name__, fn)
