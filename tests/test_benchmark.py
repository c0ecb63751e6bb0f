"""The shared benchmark ceilings run on the CPU: the copy ceiling is the fastest real copy (an
aliased 'copy' is refused), and floors are bytes / copy rate vs FLOPs / matmul rate."""

import math

import jax
import pytest

from mamba3_jax import benchmark


def test_ceilings_take_the_fastest_real_copy_and_matmul():
    c = benchmark.measure_ceilings(copy_bytes=1 << 20, matmul_n=64, reps=2)
    rates = {k: v for k, v in c.copies.items() if isinstance(v, float)}
    assert {"jax jit(jnp.copy)", "jax jit(x * 1) bf16", "jax donated in-place x + 1"} <= set(rates)
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
    assert c.copy == max(rates.values())
    # XLA aliases a donated identity: no bytes move, so it must not count as a copy
    assert c.copies["jax donated identity"].startswith("no copy made")
    for lib in ("torch", "cupy"):  # on the CPU the GPU libraries are not asked; on a GPU
        # each one times its own copy or says in one line why it could not
        if jax.default_backend() == "cpu":
            assert c.copies[lib].startswith("skipped"), c.copies
        else:
            assert any(k.startswith(lib) for k in c.copies), c.copies
    assert c.matmul == max(v for v in c.matmuls.values() if isinstance(v, float)) > 0
    assert "jax jit(jnp.copy)" in c.detail() and "TB/s" in c.summary()


def test_roofline_maths():
    c = benchmark.Ceilings(copy=4e12, matmul=800e12)
    assert c.floor_s(nbytes=4e9) == pytest.approx(1e-3)  # memory bound
    assert c.floor_s(nbytes=4e9, flops=1.6e12) == pytest.approx(2e-3)  # compute bound
    assert benchmark.percent_of_floor(2e-3, 1e-3) == pytest.approx(50.0)


def test_compile_watch_counts_and_names_compiles_in_its_region_only():
    import logging

    import jax.numpy as jnp

    f = jax.jit(lambda x: x * 3 + 1)
    x = jnp.ones((5, 7))
    with benchmark.CompileWatch() as first:
        f(x).block_until_ready()
    assert first.count >= 1 and first.seconds > 0
    assert any("float32[5,7]" in w and "<lambda>" in w for w in first.what), first.what
    with benchmark.CompileWatch() as again:  # cached: nothing compiles
        f(x).block_until_ready()
    assert again.count == 0 and again.what == []
    # the compile log it turns on is not part of jit's cache key: a function compiled outside
    # the watch does not compile again inside it
    g = jax.jit(lambda x: x * 5 - 2)
    g(x).block_until_ready()
    with benchmark.CompileWatch() as inside:
        g(x).block_until_ready()
    assert inside.count == 0
    # jax's compile log is left as it was found
    assert logging.getLogger("jax._src.dispatch").propagate
    assert not jax.config.jax_log_compiles
