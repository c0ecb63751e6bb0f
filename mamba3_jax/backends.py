"""Scan-backend registry: which implementation runs the SSM (and its gated output).

Every backend has one signature (`mixer_core`'s): SSM inputs and state in, gated per-head output
(B, L, H, P) float32 and the final state out. The XLA forms are always registered; Pallas
kernels register themselves from `pallas_kernels` and may raise `Unsupported` for a shape, in
which case 'auto' falls back to the XLA chunked form (a forced kernel re-raises with the reason).
"""

from __future__ import annotations

import logging
from typing import Callable

import jax

from mamba3_jax.errors import Unsupported
from mamba3_jax.ops.mixer import gate_output
from mamba3_jax.ops.ssm import SSM_FORMS, per_head

log = logging.getLogger(__name__)
__all__ = ["Unsupported", "register", "resolve", "mixer_core", "step_backend"]


def _xla(form: str) -> Callable:
    fn = SSM_FORMS[form]

    def core(inp, state, *, z, D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None,
             chunk_size=64, norm_eps=1e-5):
        y, final = fn(inp, state, mimo_x, chunk_size=chunk_size)
        return gate_output(y, inp.x, z, D, mimo_x, mimo_z, mimo_o, norm_weight, norm_eps), final

    return core


BACKENDS: dict[str, Callable] = {name: _xla(name) for name in SSM_FORMS}
GROUP_AWARE: set[str] = set(SSM_FORMS)  # backends that take group-level q/k plus biases
_PALLAS_LOADED = False


def register(name: str, fn: Callable, *, group_aware: bool = False) -> None:
    """Add a backend. Unless `group_aware`, it receives per-head, biased q and k."""
    BACKENDS[name] = fn
    if group_aware:
        GROUP_AWARE.add(name)
    else:
        GROUP_AWARE.discard(name)


def _load_pallas() -> None:
    global _PALLAS_LOADED
    if not _PALLAS_LOADED:
        _PALLAS_LOADED = True
        try:
            from pallas_kernels import backend_table
        except ImportError as e:  # the package is optional at run time
            log.info("pallas_kernels not importable: %s", e)
            return
        for name, (fn, group_aware) in backend_table().items():
            register(name, fn, group_aware=group_aware)


def resolve(backend: str) -> list[str]:
    """Backends to try, in order, for a configured name."""
    if backend.startswith("pallas"):
        _load_pallas()
    if backend == "auto":
        _load_pallas()
        platform = jax.default_backend()
        preferred = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform)
        return [b for b in (preferred, "chunked") if b and b in BACKENDS]
    if backend == "pallas":
        platform = jax.default_backend()
        name = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform)
        if name is None or name not in BACKENDS:
            raise Unsupported(f"scan_backend='pallas' has no kernel for platform {platform!r}; "
                              f"registered backends: {sorted(BACKENDS)}")
        return [name]
    if backend == "pallas_interpret":
        backend = "pallas_gpu_interpret"
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; registered: {sorted(BACKENDS)}")
    return [backend]


def step_backend(backend: str) -> str:
    """Backend for one-token decode steps: the configured backend's fused step kernel
    ('<name>_step', registered by `pallas_kernels`) when there is one, else 'reference'.
    'auto' takes '<name>_auto_step' where registered ('pallas_gpu_auto_step': per call the
    kernel or the XLA step, whichever measured faster for that state dtype and rank; see
    `pallas_kernels.decode_step.pallas_triton.MEASURED`); a named Pallas backend always gets
    its kernel."""
    try:
        first = resolve(backend)[0]
    except (Unsupported, ValueError):
        return "reference"
    if backend == "auto" and first + "_auto_step" in BACKENDS:
        return first + "_auto_step"
    return first + "_step" if first + "_step" in BACKENDS else "reference"


def mixer_core(inp, state, *, backend: str = "auto", **kw):
    """Run the first backend of `resolve(backend)` that supports these inputs."""
    names = resolve(backend)
    for i, name in enumerate(names):
        try:
            return BACKENDS[name](inp if name in GROUP_AWARE else per_head(inp), state, **kw)
        except Unsupported as e:
            if i == len(names) - 1 or backend != "auto":
                raise Unsupported(f"backend {name!r}: {e}") from e
            log.debug("backend %s unsupported (%s); falling back", name, e)
    raise AssertionError("unreachable")
