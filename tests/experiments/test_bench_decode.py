"""The Table 6 decode benchmark runs end to end on CPU (interpreted kernel, the shared ceiling
measurement included): its kernel row agrees with the XLA step on the whole layer (in_proj,
SSM step, gate, out_proj), and every row has a floor, a % of it and a MIMO / SISO ratio."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))

import bench_decode  # noqa: E402


def test_bench_decode_smoke_rows_and_agreement():
    rows = bench_decode.main(["--smoke", "--models", "mamba3_mimo4", "--dtypes", "float32",
                              "--d_states", "32"])
    assert [r["impl"] for r in rows] == ["xla step", "pallas decode kernel"]
    for r in rows:
        assert r["ms"] > 0 and r["call_ms"] > 0  # timed, not failed
        assert r["floor_ms"] > 0 and r["pct"] == pytest.approx(100 * r["floor_ms"] / r["ms"])
        assert r["ratio"] is None  # no SISO row in this run
    assert float(rows[1]["err"]) < 1e-5  # kernel layer output vs XLA layer output, f32


def test_mimo_siso_ratio_and_target_summary():
    def row(model, dtype, impl, ms, pct):
        return dict(model=model, dtype=dtype, N=128, impl=impl, ms=ms, pct=pct, ratio=None)

    rows = [row("mamba3_siso", "bf16", "k", 0.2, 90.0), row("mamba3_siso", "bf16", "x", 0.4,
                                                            50.0),
            row("mamba3_mimo4", "bf16", "k", 0.25, 80.0), row("mamba3_mimo4", "bf16", "x", 0.42,
                                                              70.0),
            row("mamba3_mimo4", "fp32", "k", 1.0, 30.0)]  # no SISO twin: no ratio
    bench_decode.add_mimo_siso_ratios(rows)
    assert [r["ratio"] for r in rows] == [None, None, pytest.approx(1.25), pytest.approx(1.05),
                                          None]
    assert bench_decode.target_summary(rows) == (
        "Targets: 1 of 3 cells at >= 85% of the roofline (best implementation per cell); 1 of 2 "
        "MIMO rows at <= 1.15x SISO.")


def test_bench_decode_profile_prints_top_kernels(capsys):
    bench_decode.main(["--smoke", "--models", "mamba3_siso", "--dtypes", "float32",
                       "--d_states", "32", "--profile", "3"])
    out = capsys.readouterr().out
    assert out.count("ms per step over 3 step(s)") == 2  # one traced scan per implementation
