"""The training-throughput benchmark runs end to end on CPU (tiny model, scanned layers, remat,
grad accumulation) and its planning / scaling / table logic is right."""

import json
import math
import os
import sys
from types import SimpleNamespace

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))

import bench_train  # noqa: E402


def test_smoke_run_reports_a_timed_row_and_writes_json(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    rows = bench_train.main(["--smoke", "--in_process", "--profile", "1"])
    assert len(rows) == 1
    r = rows[0]
    assert "error" not in r, r
    assert r["scan_layers"] is True and r["remat"] == "full" and r["grad_accum"] == 2
    assert r["tokens_per_step"] == 2 * 2 * 64  # micro x devices x accum x seq_len
    assert r["compile_s"] > 0 and r["first_step_s"] >= r["compile_s"] and r["step_ms"] > 0
    assert 0 < r["lower_s"] < r["compile_s"]  # the lowering is part of the compile time
    assert abs(r["tokens_per_s"] * r["step_ms"] / 1e3 / r["tokens_per_step"] - 1) < 1e-2
    if jax.default_backend() == "cpu":
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
    else:
        assert isinstance(r["mfu"], float) and 0 <= r["mfu"] < 1  # ~0 for this tiny model
    assert math.isfinite(r["loss"]) and 0 < r["loss"] < 1.1 * math.log(257)
    assert r["scaling"] == 1.0
    assert json.loads((tmp_path / "bench_train.json").read_text()) == rows
    assert "| tiny " in (tmp_path / "bench_train.md").read_text()
    # --profile: one traced step's device time by kind of work, and its top kernels
    prof = r["profile_ms_per_step"]
    assert sum(v for k, v in prof.items() if k != "top") > 0 and prof["top"], prof
    assert "by kind of work" in (tmp_path / "bench_train.md").read_text()


def test_plan_devices_meshes_and_overrides():
    args = SimpleNamespace(smoke=False, configs="180m,1.5b", devices="1,2", mesh="dp,fsdp",
                           micro=0, accum=3, warmup=1, steps=5, set=["train.remat=dots"],
                           profile=0, trace_compile=False)
    cases = bench_train.plan(args)
    assert [(c["config"], c["devices"], c["mesh"]) for c in cases] == [
        ("180m", 1, "dp"), ("180m", 2, "dp"), ("180m", 2, "fsdp"),
        ("1.5b", 1, "dp"), ("1.5b", 2, "dp"), ("1.5b", 2, "fsdp")]
    assert {c["accum"] for c in cases} == {3} and cases[3]["micro"] == bench_train.CASES["1.5b"][3]
    c = bench_train.case_config(cases[2])  # 180m on 2 devices, fsdp
    assert (c.mesh.data, c.mesh.fsdp) == (1, 2) and c.train.remat == "dots"
    assert c.data.batch_size == cases[2]["micro"] * 2 * 3 and c.train.grad_accum == 3
    # the paper config's layout: SISO unrolled at 12 and 24 layers; --set wins over the
    # 1.5B's own remat ("none")
    assert not c.model.scan_layers and c.model.vocab_size == 100352
    big = bench_train.case_config(cases[3])
    assert not big.model.scan_layers and big.train.remat == "dots"


def test_scaling_is_per_device_throughput_relative_to_one_device():
    rows = [{"config": "a", "devices": 1, "mesh": "dp", "set": [],
             "tokens_per_s_per_device": 100.0},
            {"config": "a", "devices": 2, "mesh": "fsdp", "set": [],
             "tokens_per_s_per_device": 90.0},
            {"config": "b", "devices": 2, "mesh": "dp", "set": [], "error": "oom"}]
    bench_train.add_scaling(rows)
    assert rows[0]["scaling"] == 1.0 and rows[1]["scaling"] == 0.9 and "scaling" not in rows[2]
    assert "error: oom" in bench_train.table(rows[2:])
