"""Milliseconds per training step of one state-tracking cell (all learning rates at once), per
scan backend and kernel chunk, side by side in one process: which setting a GPU study should use.

    python experiments/bench_state_tracking.py --backends chunked,pallas --chunks 16,32,64
    python experiments/bench_state_tracking.py --backends pallas --copies 8,16,40
    python experiments/bench_state_tracking.py --preset ci --backends chunked --steps 5  # CPU

Prints one row per (backend, chunk): compile + first step s, ms per step (device-synchronised,
the same 8 batches cycled), batch generation ms on the host, and the first step's mean loss over
the learning rates (equal across rows of one copy count up to rounding: the same maths).
`--copies` times other numbers of vmapped model copies (learning rates spread over the preset's
range): if ms per copy falls as copies grow, several seeds of a cell could train in one vmap
(5 seeds x 8 rates = 40). `--trace DIR` adds a
jax.profiler trace of 5 steps per row and its summary (mamba3_jax.training.trace_summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import state_tracking as st  # noqa: E402

from mamba3_jax.tasks import get_task, make_batch  # noqa: E402
from mamba3_jax.training.lr_sweep import LRSweep  # noqa: E402


def time_cell(task_name, variant, p, backend, chunk, steps, trace=None, copies=0) -> dict:
    task = get_task(task_name)
    if copies and copies != len(p.lrs):
        p = dataclasses.replace(p, lrs=tuple(float(x) for x in np.geomspace(
            min(p.lrs), max(p.lrs), copies)))
    cfg = dataclasses.replace(st.model_config(task_name, variant, p, task.vocab_size),
                              scan_backend=backend, chunk_size=chunk)
    rng = np.random.default_rng(0)
    hi = max(p.stage_lengths)
    t0 = time.time()
    batches = [make_batch(task, rng, p.batch_size, p.min_len, hi, pad_to=hi + 1)
               for _ in range(8)]
    gen_ms = (time.time() - t0) / 8 * 1e3
    t0 = time.time()
    sweep = LRSweep(cfg, p.lrs, p.warmup + steps + 10, warmup=p.warmup,
                    weight_decay=p.weight_decay)
    first = float(np.mean(np.asarray(sweep.step(batches[0], 0))))
    compile_s = time.time() - t0
    for i in range(1, 4):
        losses = sweep.step(batches[i % 8], i)
    jax.block_until_ready(losses)
    t0 = time.time()
    for i in range(steps):
        losses = sweep.step(batches[i % 8], i)
    jax.block_until_ready(losses)
    ms = (time.time() - t0) / steps * 1e3
    if trace:
        folder = os.path.join(trace, f"{backend}_c{chunk}")
        jax.profiler.start_trace(folder)
        for i in range(5):
            losses = sweep.step(batches[i % 8], i)
        jax.block_until_ready(losses)
        jax.profiler.stop_trace()
        subprocess.run([sys.executable, "-m", "mamba3_jax.training.trace_summary", folder,
                        "--steps", "5", "--top", "12"], check=False)
    return {"backend": backend, "chunk": chunk, "copies": len(p.lrs), "compile_s": compile_s,
            "ms": ms,
            "gen_ms": gen_ms, "first_loss": first}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="fast", choices=sorted(st.PRESETS))
    ap.add_argument("--task", default="parity", choices=list(st.LAYERS))
    ap.add_argument("--variant", default="mamba3", choices=list(st.VARIANTS))
    ap.add_argument("--backends", default="chunked,pallas")
    ap.add_argument("--chunks", default="16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--copies", default="0",
                    help="comma-separated numbers of vmapped copies (0: the preset's rates)")
    ap.add_argument("--trace", default=None, metavar="DIR")
    args = ap.parse_args(argv)
    p = st.PRESETS[args.preset]
    rows = [time_cell(args.task, args.variant, p, b, int(c), args.steps, args.trace, int(n))
            for b in args.backends.split(",") for c in args.chunks.split(",")
            for n in args.copies.split(",")]
    print(f"\n{args.task}/{args.variant}, preset {args.preset} (batch {p.batch_size}, "
          f"{len(p.lrs)} learning rates), {jax.devices()[0].device_kind}")
    print("| backend | chunk | copies | compile + first step s | ms / step | ms / step / copy | "
          "batch gen ms | first loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['chunk']} | {r['copies']} | {r['compile_s']:.1f} | "
              f"{r['ms']:.2f} | {r['ms'] / r['copies']:.3f} | {r['gen_ms']:.2f} | "
              f"{r['first_loss']:.4f} |")
    return rows


if __name__ == "__main__":
    main()
