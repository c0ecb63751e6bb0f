"""The SSM decode-step benchmark runs end to end on CPU (interpreted kernel variants, the shared
ceiling measurement included): every variant agrees with the XLA step and gets a % of the
copy-bandwidth floor."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))

import bench_decode_step  # noqa: E402


def test_bench_decode_step_smoke():
    rows = bench_decode_step.main(["--smoke", "--dtypes", "float32", "--ranks", "4",
                                   "--variants", "P:4,8:2:noevict"])
    assert [r["impl"] for r in rows] == ["xla step", "xla einsum step", "kernel bp=P w=4",
                                         "kernel bp=8 w=2 no-evict"]
    for r in rows:
        assert r["us"] > 0 and r["pct"] == pytest.approx(100 * r["floor_us"] / r["us"])
        assert all(float(e) < 1e-5 for e in r["err"].split(", "))  # outputs, final h vs XLA


def test_once_runs_every_variant_without_timing_and_checks_it(capsys):
    """`--once` (the pass ncu profiles): one chain per variant, checked against the XLA step;
    `--ncu_metrics` prints the metric list ncu takes."""
    rows = bench_decode_step.main(["--smoke", "--once", "--dtypes", "bfloat16", "--ranks", "1",
                                   "--variants", "P:4,8:2:xlatrig"])
    assert [r["impl"] for r in rows] == ["xla step", "kernel bp=P w=4", "kernel bp=8 w=2 xla-trig"]
    assert rows[0]["err"] == 0.0 and all(r["err"] < 1e-2 for r in rows)
    assert "ceilings" not in capsys.readouterr().out  # no timing, no ceiling measurement
    assert bench_decode_step.main(["--ncu_metrics"]) == []
    metrics = capsys.readouterr().out.strip().split(",")
    assert "launch__registers_per_thread" in metrics and len(metrics) == len(set(metrics))


@pytest.mark.parametrize("R", [1, 4])
@pytest.mark.parametrize("form", ["xla einsum step"])
def test_xla_forms_match_ssm_step(form, R):
    """The other XLA formulations are the same step: outputs and every state field, f32."""
    import jax
    import numpy as np

    state, inp, prm = bench_decode_step.make_step(jax.random.PRNGKey(R), 2, 4, 16, 32, R,
                                                  np.float32, np.float32)
    want = bench_decode_step.xla_step(state, inp, prm)
    got = bench_decode_step.xla_step(state, inp, prm, form=bench_decode_step.XLA_FORMS[form])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-6, atol=2e-6)


def test_parse_variants():
    a, b = bench_decode_step.parse_variants("P:8,16:2:noevict")
    assert (a.block_p, a.num_warps, a.evict_first) == (None, 8, True)
    assert (b.block_p, b.num_warps, b.evict_first) == (16, 2, False)
