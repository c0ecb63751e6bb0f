"""Paper Table 6: latency of one decode step of one mixing layer (in_proj, SSM step, gate,
out_proj), batch 128, d_model 2048, P = 64, expand 2, against the memory roofline.

    python experiments/bench_decode.py                  # GPU: the whole table (make bench-decode)
    python experiments/bench_decode.py --write-docs     # ... and update docs/benchmarks.md
    python experiments/bench_decode.py --smoke          # tiny shapes, kernels interpreted (CPU)

Columns as in the paper: "fp32" runs the layer with fp32 weights, activations and SSM state,
"bf16" with bf16 weights, activations and state (the fp32 parameters of the recurrence, dt_bias,
D, norms, biases and MIMO scales, stay fp32 as in training). Each Mamba-3 cell is timed twice in
the same run: with the fused Pallas decode kernel (`scan_backend="pallas"`) and with the XLA
sequential step (`"reference"`); Mamba-2 runs its XLA step.

Timing: `--steps` decode steps run inside one jitted `lax.scan` with the cache donated, so each
step costs device time only, as the paper's CUDA-graph timing does; the median over `--reps`
such calls, divided by the steps, is the latency. A second column times one jitted call per token
(host dispatch included), as a plain Python decode loop would see it.

Roofline: the bytes one step must move, read from the arrays themselves (every parameter of the
layer once, the cache read and written, the token in and out), divided by the device's fastest
copy measured in the same run (`mamba3_jax.benchmark.measure_ceilings`: JAX, torch and cupy
copies; the old XLA-add "bandwidth" was ~1.36x too lenient). Each cell also gives MIMO / SISO
(the MIMO R=4 step's time over the SISO step's, same dtype, N and implementation; the paper's
claim is that MIMO adds FLOPs, not bytes) and the paper's H100 latency as a percentage of the
same bytes over an H100's copy rate (3.0 TB/s, an assumption: measured in earlier runs, not in
this one), so the two devices are compared as fractions of their own floors. Before timing, the
kernel step's output is checked against the XLA step on the same cache (max relative error).

The whole table (20 timed layers, each compiled twice) takes about 2-3 minutes on one H200.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba3_jax.benchmark import (  # noqa: E402
    H100_COPY_BYTES_PER_S,
    announce_ceilings,
    device_name,
    git_commit,
    markdown_table,
    percent_of_floor,
    publish,
    time_fn,
    tree_nbytes,
)
from mamba3_jax.config import ModelConfig  # noqa: E402
from mamba3_jax.layers import Block  # noqa: E402
from mamba3_jax.training import trace_summary  # noqa: E402

# Paper Table 6 (ms, one H100): (model, dtype, N) -> latency
PAPER = {
    ("mamba2", "float32", 64): 0.295, ("mamba2", "float32", 128): 0.409,
    ("mamba2", "bfloat16", 64): 0.127, ("mamba2", "bfloat16", 128): 0.203,
    ("mamba3_siso", "float32", 64): 0.310, ("mamba3_siso", "float32", 128): 0.399,
    ("mamba3_siso", "bfloat16", 64): 0.110, ("mamba3_siso", "bfloat16", 128): 0.156,
    ("mamba3_mimo4", "float32", 64): 0.333, ("mamba3_mimo4", "float32", 128): 0.431,
    ("mamba3_mimo4", "bfloat16", 64): 0.137, ("mamba3_mimo4", "bfloat16", 128): 0.179,
}
MODELS = {
    "mamba2": {"mixer": "mamba2", "d_conv": 4, "rotation": "none"},
    "mamba3_siso": {},
    "mamba3_mimo4": {"mimo_rank": 4},
}
SECTION = "## Decode latency of one layer (paper Table 6)"


def layer_config(model: str, dtype: str, d_state: int, backend: str, smoke: bool) -> ModelConfig:
    width = dict(d_model=64, headdim=16) if smoke else dict(d_model=2048, headdim=64)
    return ModelConfig(vocab_size=256, n_layer=1, d_state=d_state, expand=2, dtype=dtype,
                       param_dtype=dtype, state_dtype=dtype, scan_backend=backend,
                       **width, **MODELS[model])


def build(cfg: ModelConfig, batch: int):
    """The mixer of one block, split into (graphdef, params), and a zero cache."""
    mixer = Block(cfg, rngs=nnx.Rngs(0)).mixer
    graphdef, params = nnx.split(mixer)
    return graphdef, params, mixer.init_cache(batch)


def random_cache(cache, key):
    """A cache with a non-trivial state (decode from the middle of a sequence)."""
    leaves, tree = jax.tree.flatten(cache)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [
        (0.1 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        for k, x in zip(keys, leaves, strict=True)])


def decode_fns(graphdef):
    def one(params, cache, u):
        return nnx.merge(graphdef, params).step(u, cache)

    def many(params, cache, us):
        mixer = nnx.merge(graphdef, params)

        def body(c, u):
            out, c = mixer.step(u, c)
            return c, out

        return jax.lax.scan(body, cache, us)

    return (jax.jit(one, donate_argnums=1),
            jax.jit(many, donate_argnums=1))


def time_cell(cfg: ModelConfig, batch: int, steps: int, reps: int, profile: int = 0):
    """(scan ms per step, per-call ms per step, output of one step from a fixed cache, step
    bytes); with `profile`, also prints the top kernels of one traced scan call per step."""
    graphdef, params, cache0 = build(cfg, batch)
    one, many = decode_fns(graphdef)
    dt = jnp.dtype(cfg.dtype)
    us = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, cfg.d_model), jnp.float32)
    us = us.astype(dt)
    fixed = random_cache(cache0, jax.random.PRNGKey(2))
    first_out, _ = one(params, jax.tree.map(jnp.copy, fixed), us[0])

    box = {"cache": jax.tree.map(jnp.copy, fixed)}

    def run_scan():
        box["cache"], outs = many(params, box["cache"], us)
        jax.block_until_ready(outs)

    def run_calls():
        c = box["cache"]
        for i in range(steps):
            out, c = one(params, c, us[i])
        box["cache"] = c
        jax.block_until_ready(out)

    scan_ms = time_fn(run_scan, [()], reps=reps, warmup=1) / steps
    call_ms = time_fn(run_calls, [()], reps=reps, warmup=1) / steps
    if profile:
        rows = trace_summary.trace_rows(run_scan)
        print(trace_summary.report(rows, steps, profile), flush=True)
    step_bytes = (tree_nbytes(params) + 2 * tree_nbytes(cache0)
                  + 2 * batch * cfg.d_model * dt.itemsize)
    return scan_ms, call_ms, np.asarray(first_out, np.float32), step_bytes


COLUMNS = ["model", "dtype", "N", "implementation", "ms / step (in-jit scan)",
           "ms / step (one call per token)", "roofline ms (bytes)", "% of roofline",
           "MIMO / SISO", "paper H100 ms (% of H100 roofline)", "max rel err vs xla"]
TARGET_PCT, TARGET_MIMO_RATIO = 85.0, 1.15  # issue 10: every cell >= 85%, MIMO <= 1.15 x SISO


def add_mimo_siso_ratios(rows: list[dict]) -> None:
    """Set each timed MIMO row's "ratio" to its ms over the SISO row's of the same dtype, N and
    implementation (None when that SISO row is missing or failed)."""
    siso = {(r["dtype"], r["N"], r["impl"]): r["ms"] for r in rows
            if r["model"] == "mamba3_siso" and r["ms"]}
    for r in rows:
        key = (r["dtype"], r["N"], r["impl"])
        if r["model"] == "mamba3_mimo4" and r["ms"] and key in siso:
            r["ratio"] = r["ms"] / siso[key]


def target_summary(rows: list[dict]) -> str:
    """One line: how many cells reach the issue's targets (best implementation per cell)."""
    best: dict = {}
    for r in rows:
        if r["pct"] is not None:
            key = (r["model"], r["dtype"], r["N"])
            best[key] = max(best.get(key, 0.0), r["pct"])
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    ok_pct = sum(p >= TARGET_PCT for p in best.values())
    ok_ratio = sum(x <= TARGET_MIMO_RATIO for x in ratios)
    return (f"Targets: {ok_pct} of {len(best)} cells at >= {TARGET_PCT:.0f}% of the roofline "
            f"(best implementation per cell); {ok_ratio} of {len(ratios)} MIMO rows at <= "
            f"{TARGET_MIMO_RATIO}x SISO.")


def table_row(r: dict) -> list:
    def fmt(v, f, unit=""):
        return "-" if v is None else format(v, f) + unit

    floor = "-" if r["floor_ms"] is None else f"{r['floor_ms']:.4f} ({r['bytes'] / 1e6:.0f} MB)"
    paper = "-" if r["paper"] is None else f"{r['paper']:.3f} ({fmt(r['paper_pct'], '.0f', '%')})"
    return [r["model"], r["dtype"], r["N"], r["impl"], fmt(r["ms"], ".4f"),
            fmt(r["call_ms"], ".4f"), floor, fmt(r["pct"], ".0f", "%"), fmt(r["ratio"], ".2f"),
            paper, r["err"]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--d_states", default="64,128")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timed call")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted kernels (CPU)")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="also trace one scan call per cell and print its TOP kernels per step")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.reps = 4, 3, 2
    elif jax.default_backend() not in ("gpu", "cuda"):
        sys.exit("the benchmark needs a GPU (use --smoke on the CPU)")
    kernel_backend = "pallas_interpret" if args.smoke else "pallas"
    t_start = time.perf_counter()
    ceil = announce_ceilings(args.smoke)

    rows = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for n in (int(s) for s in args.d_states.split(",")):
                impls = ([("xla step", "reference")] if model == "mamba2" else
                         [("pallas decode kernel", kernel_backend), ("xla step", "reference")])
                ref_out = None
                for label, backend in reversed(impls):  # the XLA step first: the reference
                    cfg = layer_config(model, dtype, n, backend, args.smoke)
                    paper = PAPER.get((model, dtype, n))
                    r = dict(model=model, dtype=dtype, N=n, impl=label, ms=None, call_ms=None,
                             floor_ms=None, bytes=0, pct=None, ratio=None, paper=paper,
                             paper_pct=None, err="-")
                    try:
                        scan_ms, call_ms, out, step_bytes = time_cell(
                            cfg, args.batch, args.steps, args.reps, args.profile)
                    except Exception as e:  # report and go on with the other cells
                        print(f"{model} {dtype} N={n} {label}: FAILED {type(e).__name__}: {e}",
                              flush=True)
                        r["err"] = f"FAILED {type(e).__name__}"
                        rows.append(r)
                        continue
                    if ref_out is None:
                        ref_out = out
                    else:
                        scale = float(np.max(np.abs(ref_out))) or 1.0
                        r["err"] = f"{float(np.max(np.abs(out - ref_out))) / scale:.1e}"
                    floor_s = ceil.floor_s(step_bytes)
                    r.update(ms=scan_ms, call_ms=call_ms, floor_ms=1e3 * floor_s,
                             bytes=step_bytes, pct=percent_of_floor(scan_ms * 1e-3, floor_s))
                    if paper is not None:  # the same bytes over the paper's device
                        r["paper_pct"] = percent_of_floor(
                            paper * 1e-3, step_bytes / H100_COPY_BYTES_PER_S)
                    rows.append(r)
                    print(f"[{time.perf_counter() - t_start:.0f}s] "
                          + " | ".join(str(c) for c in table_row(r)), flush=True)
    add_mimo_siso_ratios(rows)
    table = markdown_table(COLUMNS, [table_row(r) for r in rows])
    command = "python experiments/bench_decode.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    intro = (f"Device: {device_name()}; jax {jax.__version__}; commit {git_commit()}; "
             f"command: `{command.strip()}`; ceilings measured in the same run: "
             f"{ceil.summary()}. Batch {args.batch}, {args.steps} steps per timed call, median "
             f"of {args.reps}; {time.perf_counter() - t_start:.0f} s in all. Paper H100 %: its "
             f"latency against the same bytes over {H100_COPY_BYTES_PER_S / 1e12:.1f} TB/s "
             f"(assumed H100 copy rate). {target_summary(rows)}")
    publish(intro, table, out_name="bench_decode.md", section=SECTION,
            write_docs=args.write_docs,
            doc_preamble=__doc__.split("\n\n")[0].replace("\n", " ") + "\n\n")
    return rows


if __name__ == "__main__":
    main()
