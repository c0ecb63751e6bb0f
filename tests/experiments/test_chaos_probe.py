"""The chaos probe's driver: per seed one run at the rate alone and one with the other rate as
a second vmapped copy, the same preset, and the first copy's metrics reported. Training itself
(`state_tracking.train_cell`, the vmapped sweep) has its own tests; here it is recorded."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))

import chaos_probe  # noqa: E402


def test_each_seed_runs_alone_then_beside_the_other_rate(monkeypatch):
    calls = []

    def train_cell(task, variant, preset, seed, log):
        calls.append((task, variant, seed, preset.lrs, preset.steps_per_stage,
                      preset.eval_length))
        n = len(preset.lrs)  # a distinct result per run and per copy
        return dict(scaled_acc_train_length_per_lr=[10.0 * n + seed + i for i in range(n)],
                    scaled_acc_per_lr=[-1.0 * n - seed - i for i in range(n)],
                    final_loss_per_lr=[0.5 / n + i for i in range(n)])

    monkeypatch.setattr(chaos_probe.state_tracking, "train_cell", train_cell)
    rows = chaos_probe.main(["--seeds", "3,7", "--lr", "2e-3", "--other_lr", "5e-3",
                             "--steps_per_stage", "40"])
    assert [c[:4] for c in calls] == [("mod_sum", "mamba3", 3, (2e-3,)),
                                      ("mod_sum", "mamba3", 3, (2e-3, 5e-3)),
                                      ("mod_sum", "mamba3", 7, (2e-3,)),
                                      ("mod_sum", "mamba3", 7, (2e-3, 5e-3))]
    assert all(c[4:] == (40, 64) for c in calls)
    assert [(r["seed"], r["copies"], r["lr"]) for r in rows] == [
        (3, 1, 2e-3), (3, 2, 2e-3), (7, 1, 2e-3), (7, 2, 2e-3)]
    # the first copy's numbers, whatever the second copy did
    assert [(r["acc_train_length"], r["acc_64"], r["final_loss"]) for r in rows] == [
        (13.0, -4.0, 0.5), (23.0, -5.0, 0.25), (17.0, -8.0, 0.5), (27.0, -9.0, 0.25)]
