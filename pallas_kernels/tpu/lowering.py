"""Lower the TPU kernels on a machine without a TPU, and read back the Mosaic modules.

`jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))` runs the real Pallas -> Mosaic
lowering on the CPU: block-shape rules, primitive lowering rules and the Mosaic op verifiers all
run, and every `pallas_call` becomes a `tpu_custom_call` whose backend config carries the
serialized Mosaic module. `mosaic_kernels` decodes those modules again (base64, MLIR bytecode,
`mosaic-serde` deserialization) and verifies them, which proves the serialization round-trips.
What stays untested without a TPU: Mosaic's layout passes and the LLO compile inside libtpu
(e.g. an unsupported relayout or a VMEM overflow only shows up there).
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Callable

import jax

#: device kinds as a TPU reports them (v5e is "TPU v5 lite", v6e "TPU v6 lite")
DEFAULT_DEVICE_KIND = "TPU v5 lite"


def abstract_tpu_mesh(device_kind: str = DEFAULT_DEVICE_KIND, num_cores: int = 1):
    """Context in which JAX believes the target is the given TPU (no hardware needed).

    Uses jax's private abstract-device API; falls back to a no-op context where it is missing.
    """
    try:
        import jax._src.mesh as mesh_lib
        from jax.sharding import AbstractMesh

        device = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=num_cores,
                                         platform="tpu")
        mesh = AbstractMesh((1,), ("_tpu_lowering",), abstract_device=device)
        return mesh_lib.use_abstract_mesh(mesh)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other jax versions
        return contextlib.nullcontext()


def lower_for_tpu(fn: Callable, *args, device_kind: str = DEFAULT_DEVICE_KIND):
    """jax.stages.Lowered of `jax.jit(fn)(*args)` for the TPU platform (args: arrays or
    ShapeDtypeStructs)."""
    with abstract_tpu_mesh(device_kind):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))


def _custom_call_configs(lowered) -> list[tuple[str, dict]]:
    module = lowered.compiler_ir("stablehlo")
    found = []

    def visit(op):
        op = op.operation if hasattr(op, "operation") else op
        if op.name == "stablehlo.custom_call":
            attrs = op.attributes
            target = attrs["call_target_name"].value
            if target == "tpu_custom_call":
                name = attrs["kernel_name"].value if "kernel_name" in attrs else "?"
                found.append((name, json.loads(attrs["backend_config"].value)))
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    visit(inner)

    visit(module.operation)
    return found


def mosaic_kernels(lowered) -> dict[str, str]:
    """{kernel name: Mosaic module text} for every TPU kernel in a lowered computation.

    Each serialized module is decoded and deserialized with the Mosaic dialect registered and
    must pass the MLIR verifier; raises on any failure.
    """
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib import tpu as tpu_lib
    from jax._src.lib.mlir import ir
    from jaxlib.mlir.passmanager import PassManager

    out = {}
    for name, cfg in _custom_call_configs(lowered):
        body = base64.b64decode(cfg["custom_call_config"]["body"])
        if body[:4] != b"ML\xefR":
            raise ValueError(f"kernel {name}: body is not MLIR bytecode")
        ctx = jmlir.make_ir_context()
        tpu_lib.register_dialect(ctx)
        with ctx:
            ctx.allow_unregistered_dialects = True
            module = ir.Module.parse(body)
            PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(
                module.operation)
            if not module.operation.verify():
                raise ValueError(f"kernel {name}: Mosaic module fails verification")
            out[name] = str(module)
    return out
