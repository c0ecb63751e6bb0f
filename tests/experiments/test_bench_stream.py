"""experiments/bench_stream.py: the XLA and Pallas Triton streams compute the same update
(interpreted on the CPU), and the Mosaic GPU forms lower for CUDA (jax's Mosaic GPU interpreter
has no predicated TMA copies, which `emit_pipeline` issues: their results are checked on the GPU,
the benchmark's error column against XLA's)."""

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_stream


def test_smoke_rows_agree_with_xla():
    rows = bench_stream.main(["--smoke", "--triton", "16:2,P:4,8:2", "--mosaic", ""])
    assert {r["impl"] for r in rows} == {"xla", "triton 16:2", "triton P:4", "triton 8:2"}
    for r in rows:
        assert "error" not in r, r
        # float32: XLA may fuse the multiply-add into one FMA where the kernel rounds twice
        assert r["err"] <= (0.0 if r["dtype"] == "bfloat16" else 1e-6), r


def test_bad_mosaic_variant_is_one_line():
    with pytest.raises(SystemExit, match="seq must be"):
        bench_stream.variants("", "16:2:x", interpret=True)


@pytest.mark.skipif(bench_stream.plgpu is None, reason="this jax has no Pallas Mosaic GPU")
def test_mosaic_lowers_for_cuda():
    h = jax.ShapeDtypeStruct((4, 2, 64, 128), jnp.bfloat16)
    for seq in ("-", "p", "h"):
        text = jax.jit(lambda x, s=seq: bench_stream.mosaic_update(x, 32, 2, s)).trace(h).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text
    with pytest.raises(ValueError, match="shared memory"):  # 4 stages of 2 x 32 KB tiles
        jax.jit(lambda x: bench_stream.mosaic_update(x, 64, 4, "h")).trace(
            jax.ShapeDtypeStruct((4, 8, 64, 128), jnp.float32)).lower(lowering_platforms=("cuda",))
