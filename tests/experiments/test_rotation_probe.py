"""The rotation probe: its counter fit finds an exact Z5 counter and measures a noisy one, and
the whole probe (train, evaluate, read the model's rotations) runs on a CPU in seconds."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import rotation_probe  # noqa: E402

from mamba3_jax.tasks import get_task, make_batch  # noqa: E402
from mamba3_jax.tasks.state_tracking import DIGIT0, MINUS  # noqa: E402


def _tokens(n=64, length=31):
    b = make_batch(get_task("mod_sum"), np.random.default_rng(0), n, length, length)
    return b["inputs"][:, -1 - length:-1]


def _increments(tokens, c, noise=0.0, seed=0):
    """(1 layer, T, B, 1 head, 2 pairs): pair 1 turns by +-c d UNIT at each term's digit (the
    operator decides the sign), plus noise; pair 0 by unrelated angles."""
    rng = np.random.default_rng(seed)
    B, T = tokens.shape
    inc = np.zeros((1, T, B, 1, 2))
    sign = np.where(tokens[:, 1::2] == MINUS, -1.0, 1.0)
    digit = tokens[:, 2::2] - DIGIT0
    inc[0, 2::2, :, 0, 1] = (sign * c * digit * rotation_probe.UNIT).T
    inc[0, :, :, 0, 1] += noise * rotation_probe.UNIT * rng.standard_normal((T, B))
    inc[0, :, :, 0, 0] = rng.uniform(-np.pi, np.pi, (T, B))
    return np.angle(np.exp(1j * inc))


def test_an_exact_counter_is_found_with_its_multiplier():
    tokens = _tokens()
    best = rotation_probe.counter_fit(_increments(tokens, c=3), tokens)[0]
    assert (best["layer"], best["pair"], best["c"]) == (0, 1, 3)
    assert best["rms"] < 1e-6 and abs(best["bias"]) < 1e-6 and best["spread"] < 1e-6


def test_a_noisy_counter_shows_its_spread_and_a_random_channel_fits_badly():
    tokens = _tokens()
    rows = rotation_probe.counter_fit(_increments(tokens, c=2, noise=0.05), tokens)
    best = rows[0]
    assert (best["pair"], best["c"]) == (1, 2)
    # two noisy positions per term (operator and digit): spread ~ 0.05 sqrt(2)
    assert best["spread"] == pytest.approx(0.05 * np.sqrt(2), rel=0.2)
    assert best["rms"] < 0.05  # the mean over many contexts stays close
    assert min(r["rms"] for r in rows if r["pair"] == 0) > 0.3


def test_the_probe_runs_end_to_end(capsys):
    out = rotation_probe.main(["--steps_per_stage", "30", "--probe_length", "7",
                               "--eval_length", "9", "--top", "2"])
    assert out["result"]["task"] == "mod_sum" and out["result"]["train_length"] == 24
    assert len(out["channels"]) == 2 * 4 * 4  # 2 layers x 4 pairs (d_state 16) x c in 1..4
    assert "best counting channels" in capsys.readouterr().out
    lm_rule = rotation_probe.main(["--steps_per_stage", "30", "--probe_length", "7",
                                   "--eval_length", "9", "--paper_rotation"])
    assert lm_rule["result"]["config"]["rotation_dt"] and lm_rule["result"]["config"][
        "tie_embeddings"]
    assert "paper rotation" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--probe_length wants an odd number"):
        rotation_probe.main(["--probe_length", "8"])
    with pytest.raises(SystemExit, match="must outlast the warm-up"):
        rotation_probe.main(["--steps_per_stage", "3"])
