"""The real (non-interpret) TPU kernels lower for a TPU on this CPU-only machine.

`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))` under an abstract TPU device runs the
Pallas -> Mosaic lowering (block-shape rules, lowering rules, Mosaic op verifiers) and serializes
every kernel into a `tpu_custom_call`; `mosaic_kernels` deserializes and verifies each module
again. Mosaic's layout passes and the final compile need a TPU and are not covered here.
"""

import jax
import jax.numpy as jnp
import pytest

from mamba3_jax import backends
from mamba3_jax.ops.ssm import SSMInputs, SSMState
from pallas_kernels.tpu import (
    BlockSizes,
    KernelUnsupported,
    chunked_core_tpu,
    ssm_rows_tpu,
    ssm_step_tpu,
)
from pallas_kernels.tpu.lowering import lower_for_tpu, mosaic_kernels

# model-sized per-head shapes (N 128, P 64, S = N/4 rotary angles), short sequences
B, H, N, P, S, L = 1, 2, 128, 64, 32, 512


def _specs(R, dtype, L=L):
    sds = jax.ShapeDtypeStruct
    inp = SSMInputs(q=sds((B, L, R, H, N), dtype), k=sds((B, L, R, H, N), dtype),
                    x=sds((B, L, H, P), dtype), angle_inc=sds((B, L, H, S), jnp.float32),
                    log_decay=sds((B, L, H), jnp.float32), gamma=sds((B, L, H), jnp.float32),
                    eta=sds((B, L, H), jnp.float32), reset=sds((B, L), jnp.bool_))
    state = SSMState(angle=sds((B, H, S), jnp.float32), h=sds((B, H, P, N), jnp.float32),
                     k_prev=sds((B, R, H, N), dtype), x_prev=sds((B, H, P), dtype))
    mimo = sds((H, R, P), jnp.float32) if R > 1 else None
    return inp, state, mimo


def _check_kernels(lowered, names):
    kernels = mosaic_kernels(lowered)
    assert sorted(kernels) == sorted(names)
    for name, text in kernels.items():
        if "chunked" in name:
            assert "#tpu.dimension_semantics<arbitrary>" in text  # the sequential chunk axis
        matmuls = [line for line in text.splitlines() if "tpu.matmul" in line]
        assert matmuls
        for line in matmuls:
            # a dot of f32 operands must ask the MXU for full precision (else it runs in bf16);
            # a dot of bf16 operands must not pay for it
            operands = line.rsplit(" : ", 1)[1]
            f32_operands = operands.split(",")[0].strip().endswith("xf32>")
            assert ("contract_precision<fp32>" in line) == f32_operands, line
    return kernels


@pytest.mark.parametrize("R,dtype,chunk", [(1, jnp.float32, 128), (4, jnp.bfloat16, 32),
                                           (1, jnp.bfloat16, 64)])
def test_forward_and_backward_lower_for_tpu(R, dtype, chunk):
    inp, state, mimo = _specs(R, dtype)
    z = jax.ShapeDtypeStruct((B, L, H, P), dtype)
    D = jax.ShapeDtypeStruct((H,), jnp.float32)

    def fwd(i, s, z, D, m):
        return chunked_core_tpu(i, s, z=z, D=D, mimo_x=m, blocks=BlockSizes(chunk=chunk))

    kernels = _check_kernels(lower_for_tpu(fwd, inp, state, z, D, mimo),
                             ["mamba3_tpu_chunked_fwd"])
    if dtype == jnp.bfloat16:  # the big dots run on bf16 operands
        assert "xbf16>, vector<" in kernels["mamba3_tpu_chunked_fwd"]

    def loss(i, s, m):
        y, f = ssm_rows_tpu(i, s, mimo_x=m, blocks=BlockSizes(chunk=chunk))
        return jnp.sum(y * y) + jnp.sum(f.h)

    grad = jax.grad(loss, argnums=(0, 1, 2) if mimo is not None else (0, 1))
    diff = inp._replace(reset=None)
    args = (diff, state, mimo)
    _check_kernels(lower_for_tpu(grad, *args), ["mamba3_tpu_chunked_fwd", "mamba3_tpu_chunked_bwd"])


@pytest.mark.parametrize("device_kind", ["TPU v4", "TPU v6 lite"])
def test_forward_lowers_for_other_chips(device_kind):
    inp, state, _ = _specs(1, jnp.bfloat16)
    # default chunk choice: the model's chunk_size 64 is raised to min_rows = 256 rows
    lowered = lower_for_tpu(lambda i, s: ssm_rows_tpu(i, s, chunk_size=64), inp, state,
                            device_kind=device_kind)
    kernels = mosaic_kernels(lowered)
    assert list(kernels) == ["mamba3_tpu_chunked_fwd"]
    assert "window_bounds = array<i64: 1, 1, 256, 128>" in kernels["mamba3_tpu_chunked_fwd"]


@pytest.mark.parametrize("R,state_dtype", [(1, jnp.float32), (4, jnp.bfloat16)])
def test_decode_step_lowers_for_tpu(R, state_dtype):
    sds = jax.ShapeDtypeStruct
    Bd, Hd = 4, 8
    bf = jnp.bfloat16
    state = SSMState(angle=sds((Bd, Hd, S), jnp.float32), h=sds((Bd, Hd, P, N), state_dtype),
                     k_prev=sds((Bd, R, Hd, N), bf), x_prev=sds((Bd, Hd, P), bf))
    args = (sds((Bd, R, Hd, N), jnp.bfloat16), sds((Bd, R, Hd, N), jnp.bfloat16),
            sds((Bd, Hd, P), jnp.bfloat16), sds((Bd, Hd, S), jnp.float32),
            sds((Bd, Hd), jnp.float32), sds((Bd, Hd), jnp.float32), sds((Bd, Hd), jnp.float32),
            sds((Bd,), jnp.bool_), sds((Hd, R, P), jnp.float32) if R > 1 else None)
    lowered = lower_for_tpu(lambda s, *a: ssm_step_tpu(s, *a), state, *args)
    _check_kernels(lowered, ["mamba3_tpu_decode"])
    assert "output_operand_alias" in lowered.as_text()  # the state is updated in place


def test_rows_per_chunk_must_fit_the_sublane_tiling():
    inp, state, _ = _specs(1, jnp.float32, L=24)
    with pytest.raises(KernelUnsupported, match="multiple of 8"):
        lower_for_tpu(lambda i, s: ssm_rows_tpu(i, s, blocks=BlockSizes(chunk=12)), inp, state)


def test_backends_registered_and_compiled_one_refuses_off_tpu():
    backends.resolve("pallas_interpret")  # loads and registers the Pallas backends
    for name in ("pallas_tpu", "pallas_tpu_interpret", "pallas_tpu_step",
                 "pallas_tpu_interpret_step"):
        assert name in backends.BACKENDS
    assert backends.resolve("pallas_tpu_interpret") == ["pallas_tpu_interpret"]
    assert backends.step_backend("pallas_tpu_interpret") == "pallas_tpu_interpret_step"
    if jax.default_backend() != "tpu":
        inp, state, _ = _specs(1, jnp.float32, L=8)
        with pytest.raises(backends.Unsupported, match="needs a TPU"):
            backends.BACKENDS["pallas_tpu"](inp, state, z=None, D=None)
