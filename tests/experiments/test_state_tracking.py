"""The reduced state-tracking run: Mamba-3 learns parity of short strings, the no-RoPE variant
(real, non-negative eigenvalues) cannot. A small-scale check of the paper's Table 5b claim."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import state_tracking  # noqa: E402


@pytest.mark.slow
def test_mamba3_learns_parity_and_no_rope_does_not(tmp_path):
    p = state_tracking.PRESETS["ci"]
    learned = state_tracking.train_cell("parity", "mamba3", p, log=lambda *_: None)
    real = state_tracking.train_cell("parity", "mamba3_no_rope", p, log=lambda *_: None)
    assert learned["scaled_acc"] >= 95.0, learned["scaled_acc_per_lr"]  # 100 on seeds 0-2
    assert real["scaled_acc"] <= 35.0, real["scaled_acc_per_lr"]
    state_tracking.write_results([learned, real], str(tmp_path), "ci", p)
    md = (tmp_path / "results.md").read_text()
    assert "| mamba3 | " in md and "/ 100.00" in md
    assert (tmp_path / "results.csv").read_text().count("\n") == 3


def test_results_over_seeds_give_mean_min_max_and_every_seed_in_the_csv(tmp_path):
    p = state_tracking.PRESETS["ci"]
    rows = [{"task": "parity", "variant": v, "seed": s, "scaled_acc": a, "acc": 0.5 + a / 200,
             "best_lr": 1e-3, "train_seconds": 10.0, "steps": 1, "params": 1,
             "device": "NVIDIA H200"}
            for v, accs in (("mamba3", (100.0, 90.0, 80.0)), ("mamba2", (1.0, -1.0, 3.0)))
            for s, a in zip((0, 1, 2), accs, strict=True)]
    state_tracking.write_results(rows, str(tmp_path), "ci", p)
    md = (tmp_path / "results.md").read_text()
    assert "| mamba3 | 90.00 [80.00, 100.00] n=3 / 100.00 (10s) |" in md
    assert "| mamba2 | 1.00 [-1.00, 3.00] n=3 / 0.90 (10s) |" in md
    assert "seeds [0, 1, 2]" in md and "rotation_dt=False" in md
    # the device named is the one that trained the cells, not the one writing the table
    assert "Trained on: NVIDIA H200." in md
    csv_rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert csv_rows[0].startswith("task,variant,seed,scaled_acc") and csv_rows[0].endswith("device")
    assert len(csv_rows) == 7 and csv_rows[3].startswith("parity,mamba3,2,80.00")
    assert csv_rows[3].endswith("NVIDIA H200")


def test_accuracy_at_the_training_length_follows_the_chosen_rate(tmp_path):
    """A cell records every rate's accuracy at its longest training length too; the table and
    the CSV report the one of the rate chosen at the evaluation length."""
    p = state_tracking.PRESETS["ci"]
    r = state_tracking.train_cell("parity", "mamba3", p, lrs=(1e-2, 3e-3), log=lambda *_: None)
    assert r["train_length"] == 10 and len(r["scaled_acc_train_length_per_lr"]) == 2
    assert all(-100.0 <= x <= 100.0 for x in r["scaled_acc_train_length_per_lr"])
    rows = [dict(r, seed=s, scaled_acc_per_lr=per, scaled_acc_train_length_per_lr=at)
            for s, per, at in ((0, [90.0, 10.0], [100.0, 20.0]), (1, [5.0, 30.0], [40.0, 60.0]))]
    state_tracking.write_results(rows, str(tmp_path), "ci", p)
    assert "; 80.00 at length 10)" in (tmp_path / "results.md").read_text()  # mean of 100, 60
    csv_rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    col = csv_rows[0].split(",").index("scaled_acc_train_length")
    assert [row.split(",")[col] for row in csv_rows[1:]] == ["100.00", "60.00"]
    old = {k: v for k, v in r.items() if k != "scaled_acc_train_length_per_lr"}  # older cells
    state_tracking.write_results([old], str(tmp_path / "old"), "ci", p)
    assert "at length 10)" not in (tmp_path / "old" / "results.md").read_text()


def test_state_tracking_models_use_the_parity_options_unless_paper_rotation():
    p = state_tracking.PRESETS["fast"]
    cfg = state_tracking.model_config("parity", "mamba3", p, 4)
    assert (cfg.rotation_dt, cfg.tie_embeddings) == (False, False)
    assert (cfg.d_state, cfg.num_rope_angles, cfg.n_layer) == (64, 16, 1)
    paper = state_tracking.model_config(
        "parity", "mamba3", state_tracking.dataclasses.replace(
            p, tie_embeddings=True, rotation_dt=True), 4)
    assert (paper.rotation_dt, paper.tie_embeddings) == (True, True)


def test_baseline_rows_build_and_report(tmp_path):
    """The Gated DeltaNet ([-1, 1] and [0, 1]) and Transformer++ rows: their models, and a
    table row without a paper number for the Transformer."""
    from flax import nnx

    from mamba3_jax.model import Mamba3LM, count_params

    p = state_tracking.PRESETS["ci"]
    for variant, mixer in (("gdn", "gated_deltanet"), ("gdn_01", "gated_deltanet"),
                           ("transformer", "attention")):
        cfg = state_tracking.model_config("mod_arith", variant, p, 12)
        assert cfg.mixer == mixer and cfg.n_layer == 3
        assert count_params(Mamba3LM(cfg, rngs=nnx.Rngs(0))) == cfg.num_params()
    assert state_tracking.model_config("parity", "gdn", p, 4).negative_eigenvalues
    assert not state_tracking.model_config("parity", "gdn_01", p, 4).negative_eigenvalues
    assert "gdn" in state_tracking.DEFAULT_VARIANTS
    rows = [{"task": "parity", "variant": v, "seed": 0, "scaled_acc": 50.0, "acc": 0.75,
             "best_lr": 1e-3, "train_seconds": 1.0, "steps": 1, "params": 1}
            for v in ("gdn", "transformer")]
    state_tracking.write_results(rows, str(tmp_path), "ci", p)
    md = (tmp_path / "results.md").read_text()
    assert "| gdn | 50.00 (seed 0) / 100.00 (1s) |" in md
    assert "| transformer | 50.00 (seed 0) / - (1s) |" in md
    assert "Trained on: not recorded." in md  # cells from before the device was stored


def test_cells_resume_and_shard(tmp_path, monkeypatch):
    """Finished cells are kept one file each: a rerun skips them, two shards sharing --out
    together cover the plan, and another preset's cells in --out stop a run with one line."""
    trained = []

    def fake_cell(task, variant, p, seed=0, log=print, **resume):
        trained.append((task, variant, seed))
        return {"task": task, "variant": variant, "seed": seed, "scaled_acc": 50.0 + seed,
                "acc": 0.75, "best_lr": 1e-3, "train_seconds": 1.0, "steps": 1, "params": 1}

    monkeypatch.setattr(state_tracking, "train_cell", fake_cell)
    out = str(tmp_path)
    args = ["--preset", "ci", "--tasks", "parity", "--variants", "mamba3,mamba2",
            "--seeds", "0,1", "--out", out]
    state_tracking.main(args + ["--shard", "0/2"])
    assert trained == [("parity", "mamba3", 0), ("parity", "mamba2", 0)]
    rows = state_tracking.main(args + ["--shard", "1/2"])
    assert trained[2:] == [("parity", "mamba3", 1), ("parity", "mamba2", 1)]
    assert len(rows) == 4  # both shards' cells in the tables
    assert "| mamba3 | 50.50 [50.00, 51.00]" in (tmp_path / "results.md").read_text()
    state_tracking.main(args)  # everything done: nothing trains again
    assert len(trained) == 4
    with pytest.raises(SystemExit, match="another preset or settings"):
        state_tracking.main(["--preset", "cpu", "--tasks", "parity", "--out", out])
    with pytest.raises(SystemExit, match="needs 0 <= i < n"):
        state_tracking.main(args + ["--shard", "2/2"])


def test_reduced_protocol_reuses_the_sweeping_seeds_learning_rate(tmp_path, monkeypatch):
    """--lr_from_seed S: seed S of each (task, variant) sweeps every learning rate and runs
    first; the other seeds train at its best rate alone (recorded per run); a shard takes whole
    (task, variant) groups; S must be one of the seeds."""
    trained = []

    def fake_cell(task, variant, p, seed=0, log=print, lrs=None, **resume):
        trained.append((variant, seed, lrs))
        best = {"mamba3": 3e-3, "mamba2": 1e-4}[variant] if lrs is None else lrs[0]
        return {"task": task, "variant": variant, "seed": seed, "scaled_acc": 90.0 + seed,
                "acc": 0.95, "best_lr": best, "train_seconds": 1.0, "steps": 1, "params": 1}

    monkeypatch.setattr(state_tracking, "train_cell", fake_cell)
    args = ["--preset", "ci", "--tasks", "parity", "--variants", "mamba3,mamba2", "--seeds",
            "0,1,2", "--lr_from_seed", "1", "--out", str(tmp_path)]
    state_tracking.main(args + ["--shard", "1/2"])
    assert trained == [("mamba2", 1, None), ("mamba2", 0, (1e-4,)), ("mamba2", 2, (1e-4,))]
    rows = state_tracking.main(args + ["--shard", "0/2"])
    assert trained[3:] == [("mamba3", 1, None), ("mamba3", 0, (3e-3,)), ("mamba3", 2, (3e-3,))]
    assert sorted((r["variant"], r["seed"], r.get("lr_from_seed")) for r in rows) == [
        ("mamba2", 0, 1), ("mamba2", 1, None), ("mamba2", 2, 1),
        ("mamba3", 0, 1), ("mamba3", 1, None), ("mamba3", 2, 1)]
    assert "for 4 of the 6 runs" in (tmp_path / "results.md").read_text()
    assert ",3e-03,1," in (tmp_path / "results.csv").read_text().replace("0.003", "3e-03")
    with pytest.raises(SystemExit, match="--lr_from_seed 5 is not in the seeds"):
        state_tracking.main(args[:-4] + ["--lr_from_seed", "5", "--out", str(tmp_path)])
    monkeypatch.undo()  # the real cell given lrs: that one learning rate trained and reported
    import dataclasses
    p = dataclasses.replace(state_tracking.PRESETS["ci"], steps_per_stage=3, warmup=1)
    one = state_tracking.train_cell("parity", "mamba3", p, seed=2, log=lambda *_: None,
                                    lrs=(2e-3,))
    assert one["best_lr"] == 2e-3 and len(one["scaled_acc_per_lr"]) == 1


def _recording_cell(seen: list, what):
    """A stand-in for train_cell that records what(preset) of every cell it is asked for."""

    def fake_cell(task, variant, p, seed=0, log=print, lrs=None, **resume):
        seen.append(what(p))
        return {"task": task, "variant": variant, "seed": seed, "scaled_acc": 99.0,
                "acc": 0.99, "best_lr": p.lrs[0], "train_seconds": 1.0, "steps": 1, "params": 1}

    return fake_cell


def test_learning_rates_from_the_command_line(tmp_path, monkeypatch):
    """--lrs replaces the preset's rates (what a cell trains, its settings, the table's rule);
    anything but positive numbers is one clear error before any training."""
    seen = []
    monkeypatch.setattr(state_tracking, "train_cell", _recording_cell(seen, lambda p: p.lrs))
    args = ["--preset", "ci", "--tasks", "parity", "--variants", "mamba3", "--out", str(tmp_path)]
    state_tracking.main(args + ["--lrs", "5e-3"])
    assert seen == [(5e-3,)]
    assert "one learning rate (0.005, `--lrs`)" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit, match="another preset or settings"):  # the preset's rates
        state_tracking.main(args)
    for bad in ("0", "-1e-3", "nan", "fast", ""):
        with pytest.raises(SystemExit, match="--lrs wants positive numbers"):
            state_tracking.main(args + [f"--lrs={bad}"])
    assert len(seen) == 1


def test_weight_decay_from_the_command_line(tmp_path, monkeypatch):
    """--weight_decay replaces the preset's (what a cell trains with, its settings); a negative
    or non-finite value is one clear error before any training."""
    seen = []
    monkeypatch.setattr(state_tracking, "train_cell",
                        _recording_cell(seen, lambda p: p.weight_decay))
    args = ["--preset", "ci", "--tasks", "parity", "--variants", "mamba3", "--out", str(tmp_path)]
    state_tracking.main(args + ["--weight_decay", "0"])
    assert seen == [0.0]
    assert json.load(open(tmp_path / "configs.json"))["settings"]["weight_decay"] == 0.0
    with pytest.raises(SystemExit, match="another preset or settings"):  # the preset's 0.1
        state_tracking.main(args)
    for bad in ("-0.1", "nan", "inf"):
        with pytest.raises(SystemExit, match="--weight_decay wants a number >= 0"):
            state_tracking.main(args + [f"--weight_decay={bad}"])
    assert seen == [0.0]


def test_a_stopped_cell_resumes_with_the_same_batches_and_updates(tmp_path, monkeypatch):
    """A cell cut off mid-training (a 10-minute call's end) and started again ends with the very
    losses and accuracies of one uninterrupted run: weights, optimizer state, step and the batch
    generator all come back from the snapshot."""
    import dataclasses
    monkeypatch.setattr(state_tracking, "SAVE_EVERY", 10)
    p = dataclasses.replace(state_tracking.PRESETS["ci"], steps_per_stage=30, warmup=5,
                            stage_lengths=(6, 10))
    quiet = lambda *_: None  # noqa: E731
    whole = state_tracking.train_cell("parity", "mamba3", p, seed=3, log=quiet)
    snap = str(tmp_path / "cell.partial.npz")
    assert state_tracking.train_cell("parity", "mamba3", p, seed=3, log=quiet, partial=snap,
                                     stop=lambda step: step == 37) is None
    assert os.path.exists(snap)  # saved at the stop (37), between two periodic snapshots
    resumed = state_tracking.train_cell("parity", "mamba3", p, seed=3, log=quiet, partial=snap)
    assert resumed["final_loss_per_lr"] == whole["final_loss_per_lr"]
    assert resumed["scaled_acc_per_lr"] == whole["scaled_acc_per_lr"]
    other = dataclasses.replace(p, batch_size=32)
    with pytest.raises(SystemExit, match="saved with other settings"):
        state_tracking.train_cell("parity", "mamba3", other, seed=3, log=quiet, partial=snap)


def test_bench_state_tracking_rows_agree_across_chunks():
    """The step-time script times each setting; the first step's loss is the same maths."""
    import bench_state_tracking

    rows = bench_state_tracking.main(["--preset", "ci", "--backends", "chunked",
                                      "--chunks", "8,16", "--steps", "2"])
    assert [(r["backend"], r["chunk"]) for r in rows] == [("chunked", 8), ("chunked", 16)]
    assert all(r["ms"] > 0 for r in rows)
    np.testing.assert_allclose(rows[0]["first_loss"], rows[1]["first_loss"], rtol=1e-5)
    # other copy counts: that many learning rates over the preset's range, ends included
    more = bench_state_tracking.main(["--preset", "ci", "--backends", "chunked", "--chunks", "8",
                                      "--steps", "1", "--copies", "2,3"])
    assert [r["copies"] for r in more] == [2, 3] and all(r["ms"] > 0 for r in more)
    # two copies are the ci preset's two rates (3e-3, 1e-2): the first loss of the rows above
    np.testing.assert_allclose(more[0]["first_loss"], rows[0]["first_loss"], rtol=1e-5)
