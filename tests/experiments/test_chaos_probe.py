"""The chaos probe runs: per seed one run alone and one as the first of two vmapped copies,
both at the same rate from the same weights and batches (a short CPU-scale smoke run)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))

import chaos_probe  # noqa: E402


def test_one_seed_alone_and_beside_another_rate():
    rows = chaos_probe.main(["--seeds", "5", "--steps_per_stage", "30"])
    assert [(r["seed"], r["copies"]) for r in rows] == [(5, 1), (5, 2)]
    for r in rows:
        assert r["lr"] == 1e-3 and r["final_loss"] > 0
        assert -100 <= r["acc_train_length"] <= 100 and -100 <= r["acc_64"] <= 100
