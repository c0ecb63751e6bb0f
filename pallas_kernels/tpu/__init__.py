"""Pallas Mosaic TPU kernels of the Mamba-3 SSM: chunked forward/backward
(`chunked_scan/pallas_mosaic_tpu.py`) and a decode step (`decode_step/pallas_mosaic_tpu.py`);
this package holds their shared helpers (`_common.py`), the CPU lowering check (`lowering.py`)
and the backends.

`backend_table()` lists four backends (mixer_core's signature) that `mamba3_jax.backends`
registers:
  * "pallas_tpu": chunked forward + backward kernels compiled for a TPU;
  * "pallas_tpu_step": the single-token decode kernel (L == 1; `backends.step_backend`);
  * "pallas_tpu_interpret", "pallas_tpu_interpret_step": the same kernels in Pallas interpret
    mode (any platform; slow, for tests).
Shapes the kernels cannot run raise `mamba3_jax.errors.Unsupported` ('auto' then falls back).
See docs/kernels.md, section "TPU kernels".
"""

from __future__ import annotations

import jax

from pallas_kernels.chunked_scan.pallas_mosaic_tpu import (
    BlockSizes,
    chunked_core_tpu,
    ssm_rows_tpu,
)
from pallas_kernels.chunked_scan.reference import reference as reference_core
from pallas_kernels.decode_step.pallas_mosaic_tpu import decode_core_tpu, ssm_step_tpu
from pallas_kernels.tpu._common import KernelUnsupported

__all__ = [
    "BlockSizes",
    "KernelUnsupported",
    "chunked_core_tpu",
    "decode_core_tpu",
    "make_backend",
    "on_tpu",
    "backend_table",
    "ssm_rows_tpu",
    "ssm_step_tpu",
]


def on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def make_backend(interpret: bool, *, step: bool = False, blocks: BlockSizes | None = None):
    """A `mamba3_jax.backends` backend on the TPU kernels.

    The compiled (non-interpret) backends refuse to run off a TPU (KernelUnsupported, an
    `Unsupported`). The step backend falls back to the reference form when the decode kernel
    cannot take the call (e.g. L > 1), like the GPU step backend.
    """
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
        except KernelUnsupported:
            if step:
                return reference_core(inp, state, **kw)
            raise

    backend.__name__ = name
    return backend


def backend_table() -> dict:
    """name -> (backend, group_aware) for the four TPU backends."""
    out = {}
    for interpret in (False, True):
        for step in (False, True):
            fn = make_backend(interpret, step=step)
            out[fn.__name__] = (fn, False)
    return out
