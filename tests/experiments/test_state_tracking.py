"""The reduced state-tracking run: Mamba-3 learns parity of short strings, the no-RoPE variant
(real, non-negative eigenvalues) cannot. A small-scale check of the paper's Table 5b claim."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import state_tracking  # noqa: E402


@pytest.mark.slow
def test_mamba3_learns_parity_and_no_rope_does_not(tmp_path):
    p = state_tracking.PRESETS["ci"]
    learned = state_tracking.train_cell("parity", "mamba3", p, log=lambda *_: None)
    real = state_tracking.train_cell("parity", "mamba3_no_rope", p, log=lambda *_: None)
    assert learned["scaled_acc"] >= 60.0, learned["scaled_acc_per_lr"]
    assert real["scaled_acc"] <= 35.0, real["scaled_acc_per_lr"]
    state_tracking.write_results([learned, real], str(tmp_path), "ci", p)
    md = (tmp_path / "results.md").read_text()
    assert "| mamba3 | " in md and "/ 100.00" in md
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
