"""training_curve: a run's loss / grad-norm curve, the spike and falling-loss checks, the files."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import training_curve  # noqa: E402


def write_run(folder, grad_norms, losses):
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "eval/bits_per_byte": 8.0}) + "\n")
        for i, (g, x) in enumerate(zip(grad_norms, losses, strict=True)):
            f.write(json.dumps({"step": 10 * (i + 1), "train/loss": x,
                                "train/grad_norm": g}) + "\n")
        f.write('{"step": 99999, "train/lo')  # a torn last line (killed run): skipped
    (folder / "config.json").write_text(json.dumps({"model": {"d_model": 8}}))


def test_stable_run_and_a_spike(tmp_path):
    losses = [5.0 - 0.05 * i for i in range(60)]
    write_run(tmp_path / "ok", [1.0 + 0.01 * (i % 3) for i in range(60)], losses)
    s = training_curve.main([str(tmp_path / "ok"), "--out", str(tmp_path / "ok_out")])
    assert s["falling"] and s["spike_steps"] == [] and s["last_step"] == 600
    assert "**stable**" in (tmp_path / "ok_out" / "results.md").read_text()
    assert (tmp_path / "ok_out" / "results.csv").read_text().count("\n") == 61
    assert json.loads((tmp_path / "ok_out" / "configs.json").read_text())["run_config"]

    norms = [1.0] * 60
    norms[40] = 9.0  # a spike at step 410
    write_run(tmp_path / "spiky", norms, losses)
    s = training_curve.main([str(tmp_path / "spiky"), "--out", str(tmp_path / "sp_out")])
    assert s["spike_steps"] == [410]
    assert "**NOT stable**" in (tmp_path / "sp_out" / "results.md").read_text()

    write_run(tmp_path / "rising", [1.0] * 60, losses[::-1])
    s = training_curve.main([str(tmp_path / "rising"), "--out", str(tmp_path / "r_out")])
    assert not s["falling"]


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no train/loss records"):
        training_curve.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="spike_factor must be > 1"):
        training_curve.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                             "--spike_factor", "1"])
