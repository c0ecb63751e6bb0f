"""Experiment bookkeeping: seed aggregation, study plans and report files."""

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import lm_compare  # noqa: E402
import mqar  # noqa: E402


def test_seed_aggregation_mean_and_spread():
    rows = [{"variant": "siso_N64", "eval_bpb": 2.0, "params_M": 5.0, "complete": True},
            {"variant": "siso_N64", "eval_bpb": 2.4, "params_M": 5.0, "complete": True},
            {"variant": "mamba2_N64", "eval_bpb": 2.5, "params_M": 5.1, "complete": True},
            {"variant": "mamba2_N64", "eval_bpb": None, "params_M": 5.1},  # no evaluation yet
            # a run that died or was stopped: its last evaluation (here step 0's) is no result
            {"variant": "mamba2_N64", "eval_bpb": 4.25, "params_M": 5.1, "complete": False},
            {"variant": "siso_N128", "eval_bpb": 4.25, "params_M": 5.2, "complete": False}]
    table = {t["variant"]: t for t in lm_compare.aggregate(rows)}
    assert math.isclose(table["siso_N64"]["test_bpb_mean"], 2.2)
    assert math.isclose(table["siso_N64"]["test_bpb_std"], math.sqrt(0.08))
    assert table["mamba2_N64"]["seeds"] == 1 and math.isnan(table["mamba2_N64"]["test_bpb_std"])
    assert "siso_N128" not in table


def test_plan_selects_variants(tmp_path):
    runs = lm_compare.plan("state_size", "configs/small_gpu.py", str(tmp_path), [0, 1], {},
                           ["mamba2_N128", "siso_N64"])
    assert [r["name"] for r in runs] == ["mamba2_N128_seed0", "mamba2_N128_seed1",
                                         "siso_N64_seed0", "siso_N64_seed1"]  # study order
    try:
        lm_compare.plan("state_size", "configs/small_gpu.py", str(tmp_path), [0], {}, ["siso_N8"])
    except SystemExit as e:
        assert "unknown state_size variants ['siso_N8']" in str(e)
    else:
        raise AssertionError("an unknown variant was accepted")


def test_study_plans_cover_the_paper_tables(tmp_path):
    runs = lm_compare.plan("ablations", "configs/small_gpu.py", str(tmp_path), [0, 1],
                           {"train.steps": "10"})
    assert len(runs) == 2 * len(lm_compare.PAPER_PPL)
    by_name = {r["name"]: r["overrides"] for r in runs}
    assert by_name["nobias_euler_seed1"]["model.bc_bias"] == "False"
    assert by_name["nobias_euler_seed1"]["model.discretization"] == "euler"
    assert by_name["full_seed0"]["data.eval_source.split"] == "test"
    assert all(o["train.steps"] == "10" for o in by_name.values())
    sizes = lm_compare.plan("state_size", "c.py", str(tmp_path), [0], {})
    assert {r["overrides"].get("model.d_state") for r in sizes} == {"16", "32", "64", "128"}
    assert sum(r["overrides"].get("model.mimo_rank") == "4" for r in sizes) == 4


def test_mqar_report_files(tmp_path):
    rows = [{"model": m, "d_model": 64, "d_state": n, "acc": a, "best_lr": 1e-3, "params": 1,
             "train_seconds": 1.0} for m, n, a in [("mamba2", 16, 0.2), ("mamba3_siso", 16, 0.5),
                                                   ("mamba3_siso", 32, 0.75)]]
    mqar.write_results(rows, str(tmp_path), "ci", mqar.PRESETS["ci"])
    md = (tmp_path / "results.md").read_text()
    assert "| mamba3_siso | 64 | 50.0 | 75.0 |" in md
    assert "| mamba2 | 64 | 20.0 | - |" in md
    assert {"results.md", "results.csv", "configs.json", "plot.png"} <= set(os.listdir(tmp_path))
