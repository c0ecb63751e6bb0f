"""Where the device time of a `jax.profiler` trace went: per kernel and per kind of work.

    python -m mamba3_jax.training.trace_summary workdir/profile [--steps 3] [--top 30]

Reads the newest `*.trace.json.gz` under the folder (what `train.profile_steps` writes, beside
the xplane file). On a GPU it counts the kernels on the device's streams (one event per kernel
launch; the "XLA Ops" / "XLA Modules" lines of the same device are summaries of those and are
left out, so nothing is counted twice); on a CPU the XLA executable's threads. Each kernel is
put in a kind: Pallas kernels (ours are named `mamba3_*`), matmuls (cuBLAS / cuDNN / CUTLASS /
nvjet), collectives (NCCL), copies, and XLA fusions by what they do (transpose, reduce, convert,
other elementwise). `--steps` divides the totals by the steps traced (per step ms).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path
from typing import NamedTuple

KINDS = ("pallas", "matmul", "collective", "copy", "transpose", "reduce", "convert",
         "elementwise/other")


class Row(NamedTuple):
    name: str
    kind: str
    total_us: float
    count: int


def newest_trace(folder: str | Path) -> Path:
    paths = sorted(Path(folder).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise SystemExit(f"no *.trace.json.gz under {folder} (was train.profile_steps set?)")
    return paths[-1]


def kind(name: str) -> str:
    low = name.lower()
    if low.startswith("mamba3_") or "pallas" in low:
        return "pallas"
    if any(s in low for s in ("gemm", "cublas", "cudnn", "cutlass", "nvjet", "xmma", "matmul",
                              "dot_general", "__dot")):
        return "matmul"
    if any(s in low for s in ("nccl", "all-reduce", "all_reduce", "allreduce", "all-gather",
                              "reduce-scatter", "collective")):
        return "collective"
    if "memcpy" in low or "memset" in low or low.startswith("copy"):
        return "copy"
    for k in ("transpose", "reduce", "convert"):
        if k in low:
            return k
    return "elementwise/other"


def device_events(trace: dict) -> list[dict]:
    """Complete events ("X") of the device's kernels (GPU streams), else of XLA's CPU threads."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = str(e.get("args", {}).get("name", ""))
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    gpus = {p for p, n in procs.items() if "/device:gpu" in n.lower()}
    streams = {key for key, n in threads.items() if key[0] in gpus and n.startswith("Stream")}
    if gpus and not streams:  # other stream names: every device line but the summaries
        streams = {key for key, n in threads.items() if key[0] in gpus
                   and not any(x in n for x in ("XLA Ops", "XLA Modules", "Steps", "TraceMe"))}
    if gpus:
        def keep(e):
            return (e["pid"], e.get("tid")) in streams
    else:
        def keep(e):
            t = threads.get((e["pid"], e.get("tid")), "")
            return t.startswith("tf_XLA") and not str(e.get("name", "")).startswith(("$", "end:"))
    return [e for e in events if e.get("ph") == "X" and "dur" in e and keep(e)]


def host_summary(trace: dict, top: int = 40) -> list[list]:
    """[name, total s, count] of the host's trace events (e.g. XLA's compiler passes while a
    program compiles), largest first. Nested events each count their own whole duration, so
    the totals overlap: a pass and the pipeline around it both appear."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpus = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and "/device:" in str(e.get("args", {}).get("name", "")).lower()}
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        # "$..." are Python frames (the profiler's Python tracer): XLA's own events only
        if (e.get("ph") == "X" and "dur" in e and e["pid"] not in gpus
                and not str(e.get("name", "")).startswith("$")):
            total[e["name"]] += float(e["dur"])
            count[e["name"]] += 1
    return [[n, round(t / 1e6, 3), count[n]] for n, t in total.most_common(top)]


def summarize(trace: dict) -> list[Row]:
    total, count = collections.Counter(), collections.Counter()
    for e in device_events(trace):
        total[e["name"]] += float(e["dur"])
        count[e["name"]] += 1
    return sorted((Row(n, kind(n), t, count[n]) for n, t in total.items()),
                  key=lambda r: -r.total_us)


def traced(run, folder: str | None = None) -> dict:
    """Call run() once under `jax.profiler`; the trace's JSON (in a temporary folder unless
    one is given)."""
    import tempfile

    import jax

    folder = folder or tempfile.mkdtemp(prefix="trace_rows_")
    jax.profiler.start_trace(folder)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    with gzip.open(newest_trace(folder)) as f:
        return json.load(f)


def trace_rows(run, folder: str | None = None) -> list[Row]:
    """Call run() once under `jax.profiler` and summarise the device kernels it launched."""
    return summarize(traced(run, folder))


def by_kind(rows: list[Row]) -> dict[str, float]:
    out = {k: 0.0 for k in KINDS}
    for r in rows:
        out[r.kind] += r.total_us
    return out


def report(rows: list[Row], steps: int = 1, top: int = 30) -> str:
    total = sum(r.total_us for r in rows) or 1.0
    lines = [f"device time {total / 1e3 / steps:.2f} ms per step over {steps} step(s), "
             f"{len(rows)} distinct kernels", "",
             f"{'kind':18} {'ms/step':>9} {'%':>6}"]
    for k, us in sorted(by_kind(rows).items(), key=lambda kv: -kv[1]):
        if us:
            lines.append(f"{k:18} {us / 1e3 / steps:9.3f} {100 * us / total:6.1f}")
    lines += ["", f"{'kernel':60} {'kind':18} {'ms/step':>9} {'%':>6} {'calls':>6}"]
    for r in rows[:top]:
        lines.append(f"{r.name[:60]:60} {r.kind:18} {r.total_us / 1e3 / steps:9.3f} "
                     f"{100 * r.total_us / total:6.1f} {r.count:6d}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="the trace folder, e.g. workdir/profile")
    ap.add_argument("--steps", type=int, default=1, help="steps traced (per step figures)")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    path = newest_trace(args.folder)
    with gzip.open(path) as f:
        rows = summarize(json.load(f))
    if not rows:
        raise SystemExit(f"{path}: no device kernels in the trace")
    print(f"{path}\n" + report(rows, args.steps, args.top))


if __name__ == "__main__":
    main()
