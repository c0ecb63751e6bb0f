"""The Table 6 decode benchmark runs end to end on CPU (interpreted kernel) and its kernel row
agrees with the XLA step on the whole layer (in_proj, SSM step, gate, out_proj)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))

import bench_decode  # noqa: E402


def test_bench_decode_smoke_rows_and_agreement():
    rows = bench_decode.main(["--smoke", "--models", "mamba3_mimo4", "--dtypes", "float32",
                              "--d_states", "32"])
    assert [r[3] for r in rows] == ["xla step", "pallas decode kernel"]
    for r in rows:
        assert float(r[4]) > 0 and float(r[5]) > 0  # timed, not failed
    assert float(rows[1][9]) < 1e-5  # kernel layer output vs XLA layer output, f32
