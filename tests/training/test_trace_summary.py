"""trace_summary: device kernels of a GPU trace counted once each, in the right kinds, per step;
a CPU trace of a real jitted function read too."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from mamba3_jax.training.trace_summary import (
    by_kind,
    host_summary,
    main,
    summarize,
    trace_rows,
    traced,
)


def _meta(pid, tid, kind, name):
    return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}


def _x(pid, tid, name, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur}


def gpu_trace():
    return {"traceEvents": [
        _meta(1, None, "process_name", "/host:CPU"), _meta(1, 7, "thread_name", "python"),
        _meta(2, None, "process_name", "/device:GPU:0"),
        _meta(2, 10, "thread_name", "Stream #13(Compute)"),
        _meta(2, 11, "thread_name", "XLA Ops"),
        _x(1, 7, "PjitFunction(step)", 5000.0),  # host: not device time
        _x(2, 10, "mamba3_ssd_output", 100.0), _x(2, 10, "mamba3_ssd_output", 100.0),
        _x(2, 10, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", 50.0),
        _x(2, 10, "loop_transpose_fusion_3", 30.0),
        _x(2, 10, "input_reduce_fusion_1", 10.0),
        _x(2, 10, "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 20.0),
        _x(2, 10, "loop_add_fusion", 40.0),
        _x(2, 11, "fusion.12", 300.0),  # the XLA Ops line summarises the stream's kernels
    ]}


def test_gpu_trace_counts_stream_kernels_once_by_kind(tmp_path, capsys):
    rows = summarize(gpu_trace())
    assert [r.name for r in rows][:2] == ["mamba3_ssd_output",
                                          "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN"]
    assert rows[0].total_us == 200.0 and rows[0].count == 2
    kinds = by_kind(rows)
    assert kinds["pallas"] == 200.0 and kinds["matmul"] == 50.0
    assert kinds["transpose"] == 30.0 and kinds["reduce"] == 10.0
    assert kinds["collective"] == 20.0 and kinds["elementwise/other"] == 40.0
    assert sum(kinds.values()) == 350.0  # neither the host nor the XLA Ops line
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "host.trace.json.gz", "wt") as f:
        json.dump(gpu_trace(), f)
    main([str(tmp_path), "--steps", "2"])
    out = capsys.readouterr().out
    assert "device time 0.17 ms per step over 2 step(s)" in out, out
    with pytest.raises(SystemExit, match="steps must be >= 1"):
        main([str(tmp_path), "--steps", "0"])


def test_gpu_lines_without_stream_names_still_counted_once():
    trace = gpu_trace()
    for e in trace["traceEvents"]:  # another profiler version's line name
        if e.get("name") == "thread_name" and e["args"]["name"].startswith("Stream"):
            e["args"]["name"] = "Compute 13"
    assert sum(by_kind(summarize(trace)).values()) == 350.0  # not the XLA Ops line's 300


def test_cpu_trace_of_a_jitted_function(tmp_path):
    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    a = jnp.ones((256, 256))
    f(a).block_until_ready()
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(3):
        f(a).block_until_ready()
    jax.profiler.stop_trace()
    path = next(tmp_path.rglob("*.trace.json.gz"))
    rows = summarize(json.load(gzip.open(path)))
    assert rows and sum(r.total_us for r in rows) > 0, rows


def test_trace_rows_of_a_call(tmp_path):
    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    a = jnp.ones((256, 256))
    f(a).block_until_ready()
    rows = trace_rows(lambda: f(a).block_until_ready(), str(tmp_path))
    assert rows and sum(r.total_us for r in rows) > 0, rows
    assert next(tmp_path.rglob("*.trace.json.gz"))  # kept where asked


def test_host_summary_sums_the_hosts_events_without_device_lines_or_python_frames():
    t = gpu_trace()
    t["traceEvents"] += [_x(1, 7, "priority-fusion", 2e6), _x(1, 8, "priority-fusion", 1e6),
                         _x(1, 7, "$stages.py:586 compile", 9e6)]  # a Python frame
    assert host_summary(t) == [["priority-fusion", 3.0, 2], ["PjitFunction(step)", 0.005, 1]]
    assert host_summary(t, top=1) == [["priority-fusion", 3.0, 2]]


def test_traced_compile_names_xla_passes(tmp_path):
    """What `bench_train.py --trace_compile` reads: XLA's compiler events of a real compile."""
    lowered = jax.jit(lambda a: jnp.tanh(a @ a).sum()).lower(jnp.ones((64, 64)))
    rows = host_summary(traced(lowered.compile, str(tmp_path)), top=200)
    names = [n for n, _, _ in rows]
    assert any("Compile" in n for n in names), names
    assert all(s >= 0 and c >= 1 and not n.startswith("$") for n, s, c in rows)


def test_missing_trace_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no \\*.trace.json.gz under"):
        main([str(tmp_path)])
