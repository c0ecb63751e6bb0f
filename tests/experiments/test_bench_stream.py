"""experiments/bench_stream.py: the XLA and Pallas Triton streams compute the same update
(interpreted on the CPU), and the Mosaic GPU forms lower for CUDA (jax's Mosaic GPU interpreter
has no predicated TMA copies, which `emit_pipeline` issues: their results are checked on the GPU,
the benchmark's error column against XLA's)."""

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_stream


def test_smoke_rows_agree_with_xla():
    rows = bench_stream.main(["--smoke", "--triton", "16:2,P:4,8:2,8:2:update,8:2:readout",
                              "--mosaic", ""])
    assert {r["impl"] for r in rows} == {"xla", "triton 16:2", "triton P:4", "triton 8:2",
                                         "triton 8:2:update", "triton 8:2:readout"}
    for r in rows:
        assert "error" not in r, r
        if r["impl"].endswith(("update", "readout")):  # float32 sums in another order
            assert r["err"] < 1e-5, r
        else:  # float32: XLA may fuse the multiply-add into one FMA where the kernel rounds twice
            assert r["err"] <= (0.0 if r["dtype"] == "bfloat16" else 1e-6), r


def test_bad_variants_are_one_line():
    with pytest.raises(SystemExit, match="seq must be"):
        bench_stream.variants("", "16:2:x", interpret=True)
    with pytest.raises(SystemExit, match="work must be"):
        bench_stream.variants("16:2:rotate", "", interpret=True)


def test_work_steps_use_their_inputs():
    """The update and readout steps read every vector: a wrong one shows in the result (the
    errors above are against `reference` with the same vectors)."""
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 16, 16), jnp.float32)
    vec = bench_stream.vectors(jax.random.PRNGKey(1), 2, 2, 16, 16)
    new, y = bench_stream.triton_update(h, vec, 8, 2, "readout", interpret=True)
    for name in vec:
        moved = dict(vec, **{name: vec[name] + 1.0})
        want_h, want_y = bench_stream.reference(h, moved, "readout")
        assert float(jnp.max(jnp.abs(want_h - new))) + float(jnp.max(jnp.abs(want_y - y))) > 1e-3


@pytest.mark.skipif(bench_stream.plgpu is None, reason="this jax has no Pallas Mosaic GPU")
def test_mosaic_lowers_for_cuda():
    h = jax.ShapeDtypeStruct((4, 2, 64, 128), jnp.bfloat16)
    for seq in ("-", "p", "h"):
        fn = jax.jit(lambda x, s=seq: bench_stream.mosaic_update(x, None, 32, 2, s)[0])
        text = fn.trace(h).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text
    with pytest.raises(ValueError, match="shared memory"):  # 4 stages of 2 x 32 KB tiles
        jax.jit(lambda x: bench_stream.mosaic_update(x, None, 64, 4, "h")[0]).trace(
            jax.ShapeDtypeStruct((4, 8, 64, 128), jnp.float32)).lower(lowering_platforms=("cuda",))
