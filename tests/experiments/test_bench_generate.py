"""The Table 7 benchmark runs on the CPU (tiny model, the shared ceilings included) and prints
every time beside its floor; the floors and the paper's H100 fraction follow the stated model."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))

import bench_generate  # noqa: E402


def test_bench_generate_smoke_rows_have_floors():
    rows = bench_generate.main(["--smoke", "--models", "siso"])
    assert [(r["model"], r["L"]) for r in rows] == [("siso", 16), ("siso", 24)]
    for r in rows:
        assert r["total"] == pytest.approx(r["prefill"] + r["decode"])
        assert 0 < r["prefill_floor"] and 0 < r["decode_floor"]
        assert r["total_floor"] == pytest.approx(r["prefill_floor"] + r["decode_floor"])
        assert r["paper"] is None  # smoke lengths are not in the paper's table
        assert len(bench_generate.table_row(r)) == len(bench_generate.COLUMNS)


def test_floors_and_paper_fraction():
    z = bench_generate.Sizes(n_params=1000, n_embed=100, param_bytes=2000, cache_bytes=500)
    pre, dec = bench_generate.floors_s(z, batch=4, L=10, copy_rate=1000.0, matmul_rate=1e4)
    # prefill: 2 x 900 weights x 40 tokens + the embedding's logits for 4 rows, over 1e4 FLOP/s
    assert pre == pytest.approx(max((2 * 900 * 40 + 2 * 100 * 4) / 1e4, 2500 / 1000.0))
    # decode: 10 tokens x max(weights + cache read and written, 2 FLOPs / weight / row)
    assert dec == pytest.approx(10 * max(3000 / 1000.0, 2 * 1000 * 4 / 1e4))
    big = z.with_vocab(vocab=30, old_vocab=20, d_model=4, itemsize=2)
    assert (big.n_params, big.n_embed, big.param_bytes) == (1040, 140, 2080)
    r = dict(model="siso", L=512, prefill=0.4, decode=3.6, total=4.0, prefill_floor=0.2,
             decode_floor=2.8, total_floor=3.0, paper=(0.51, 4.39), paper_pct=(40.0, 60.0))
    assert bench_generate.table_row(r)[-1] == f"{75.0 / 60.0:.2f}"  # our 75% over its 60%


def test_a_length_is_timed_again_only_when_its_compiles_weigh():
    """Compiles inside a timed region over 1% of it: timed again; small ones: kept and labelled."""
    class Watch:
        def __init__(self, count, seconds):
            self.count, self.seconds = count, seconds

    assert not bench_generate.retime(Watch(0, 0.0), 10.0)
    assert not bench_generate.retime(Watch(6, 0.3), 200.0)  # session 11's MIMO L = 16384
    assert bench_generate.retime(Watch(7, 45.9), 51.4)  # session 8's L = 512
    assert bench_generate.retime(Watch(1, 0.2), 10.0)


def test_warm_up_is_two_prompt_pieces(monkeypatch):
    """The untimed warm-up compiles on two pieces (the first, on a fresh cache, and one on a
    prefilled cache: on the H200 that one compiled again, 20 s inside the timed MIMO L = 16384),
    not on the shortest L (with `--lengths 16384` the old warm-up decoded 16384 tokens untimed
    and the call ran out of time); a length still runs once, timed, without compiles."""
    calls, run = [], bench_generate.run_length

    def spy(model, fns, batch, L, piece, key, warmup=False):
        calls.append((L, warmup))
        return run(model, fns, batch, L, piece, key, warmup=warmup)

    monkeypatch.setattr(bench_generate, "run_length", spy)
    rows = bench_generate.main(["--smoke", "--models", "siso"])
    assert calls == [(16, True), (16, False), (24, False)]  # smoke: piece 8, lengths 16, 24
    assert all(r["L"] in (16, 24) for r in rows)  # no compile inside a timed region
