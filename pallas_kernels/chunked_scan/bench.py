"""Prefill benchmark: the chunk-parallel kernels beside XLA's chunked form and the official
Mamba-3 Triton kernels (timed in the same call by ../shared/bench/official/fast.py).

    PYTHONPATH=. python -m pallas_kernels.chunked_scan.bench --official $OUT/official.json
    PYTHONPATH=. python -m pallas_kernels.chunked_scan.bench --smoke     # CPU, interpret mode

Inputs are the official benchmark's (`make_prefill_inputs`): bf16 Q, K (one B/C group,
RMS-normed), V, Z, per-head Angles and Trap logits; float32 ADT, DT, biases, D; P 64, N 128,
S 32, chunk 64. Both sides start from those same 11 arrays: ours forms dt-scaled angle
increments, gamma and eta from them inside the timed function, and returns the gated output
in bf16. fwd+bwd takes the gradients of all 11 inputs against a random bf16 cotangent.
Timing: median over reps of back-to-back calls, inputs cycled over two sets.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from mamba3_jax import backends
from mamba3_jax.ops.rotary import increments_from
from mamba3_jax.ops.ssm import SSMInputs, SSMState
from pallas_kernels.chunked_scan.api import chunked_scan
from pallas_kernels.chunked_scan.pallas_triton import TritonBlocks, parse_blocks
from pallas_kernels.chunked_scan.shapes import PREFILL_SHAPES

f32, bf16 = jnp.float32, jnp.bfloat16


def official_like_inputs(seed, B, L, H, G=1, N=128, P=64, R=1):
    S = N // 4
    ks = jax.random.split(jax.random.PRNGKey(seed), 12)

    def rms(u):
        return u * jax.lax.rsqrt(jnp.mean(u * u, -1, keepdims=True) + 1e-6)

    dt = jnp.exp(jax.random.uniform(ks[4], (B, L, H)) * (math.log(0.1) - math.log(1e-3))
                 + math.log(1e-3))
    a = -(1.0 + 15.0 * jax.random.uniform(ks[5], (B, L, H)))
    d = dict(
        Q=rms(jax.random.normal(ks[0], (B, L, R, G, N))).astype(bf16),
        K=rms(jax.random.normal(ks[1], (B, L, R, G, N))).astype(bf16),
        V=jax.random.normal(ks[2], (B, L, H, P)).astype(bf16),
        ADT=a * dt, DT=dt,
        Trap=jax.random.uniform(ks[6], (B, L, H)).astype(bf16),
        Q_bias=jax.random.normal(ks[7], (H, R, N)), K_bias=jax.random.normal(ks[8], (H, R, N)),
        Angles=jax.random.normal(ks[9], (B, L, H, S)).astype(bf16),
        D=jax.random.normal(ks[10], (H,)),
        Z=jax.random.normal(ks[11], (B, L, H, P)).astype(bf16))
    if R > 1:
        d.update(mimo_x=jnp.full((H, R, P), 1.0 / R), mimo_z=jnp.ones((H, R, P)),
                 mimo_o=jnp.full((H, R, P), 1.0 / R))
    return d


def layer_fn(core):
    """The 11 official inputs -> gated output (bf16), through `core` (the mixer contract)."""
    def f(d):
        B, L, R, G, N = d["Q"].shape
        H, P = d["V"].shape[2:]
        lam = jax.nn.sigmoid(d["Trap"].astype(f32))
        rate = math.pi * jnp.tanh(d["Angles"].astype(f32))  # per head here: (B, L, H, S)
        inp = SSMInputs(q=d["Q"], k=d["K"], x=d["V"], angle_inc=increments_from(rate, d["DT"]),
                        log_decay=d["ADT"], gamma=lam * d["DT"], eta=(1 - lam) * d["DT"],
                        q_bias=d["Q_bias"], k_bias=d["K_bias"], angle_rate=rate,
                        angle_dt=d["DT"], angle_pre=d["Angles"])
        state = SSMState.zeros(B, H, P, N, d["Angles"].shape[-1], R, dtype=bf16)
        extra = {k: d[k] for k in ("mimo_x", "mimo_z", "mimo_o") if k in d}
        out, _ = core(inp, state, z=d["Z"], D=d["D"], **extra)
        return out.astype(bf16)
    return f


def fwd_bwd(f):
    def g(d, dout):
        _, vjp = jax.vjp(f, d)
        return vjp(dout)[0]
    return g


def timeit(fn, arg_sets, reps, inner=5):
    for a in arg_sets:
        jax.block_until_ready(fn(*a))
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        for i in range(inner):
            out = fn(*arg_sets[(r * inner + i) % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return 1e3 * float(np.median(times))


def profiled(fn, a):
    """One call of fn between cudaProfilerStart and cudaProfilerStop (through cupy or torch)."""
    try:
        from cupy.cuda import profiler
        start, stop = profiler.start, profiler.stop
    except ImportError:
        import torch
        start, stop = torch.cuda.profiler.start, torch.cuda.profiler.stop
    jax.block_until_ready(fn(*a))
    start()
    jax.block_until_ready(fn(*a))
    stop()


def traced(fn, call, n: int) -> str:
    """fn(*call) n times under jax.profiler: device time per call by kernel, as a table."""
    from mamba3_jax.training import trace_summary

    jax.block_until_ready(fn(*call))

    def run():
        for _ in range(n):
            out = fn(*call)
        jax.block_until_ready(out)

    return trace_summary.report(trace_summary.trace_rows(run), steps=n, top=40)


def parse_variant(spec: str) -> tuple[TritonBlocks, dict]:
    """'ours' (the defaults) or 'field=value;field=value': TritonBlocks fields, and `rotary`
    (a `chunked_scan` option: 'kernel' or 'xla')."""
    items = [kv for kv in spec.split(";") if kv and spec != "ours"]
    opts = dict(kv.split("=", 1) for kv in items if kv.startswith("rotary="))
    return parse_blocks(";".join(kv for kv in items if not kv.startswith("rotary="))), opts


def impls(args):
    out = {}
    interp = args.smoke
    for spec in args.variants.split(","):
        if spec == "xla":
            out["xla chunked"] = functools.partial(backends.BACKENDS["chunked"], chunk_size=64)
            continue
        blocks, opts = parse_variant(spec)
        out[f"ours {spec}"] = functools.partial(chunked_scan, interpret=interp, blocks=blocks,
                                                **opts)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", default=None, help="official.json from fast.py, same run")
    ap.add_argument("--variants", default="ours,bp=32,xla",
                    help="comma list: ours | xla | 'bp=32;warps_grad=4' (TritonBlocks fields)")
    ap.add_argument("--shapes", default="a,b,c")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--mimo", action="store_true", help="also MIMO R=4 at shape a")
    ap.add_argument("--mimo_chunks", default="16",
                    help="MIMO chunk sizes in tokens (rows per chunk: chunk x 4)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="one extra call between cudaProfilerStart/Stop for "
                    "`ncu --profile-from-start off`")
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="N more calls of each case under jax.profiler, then its device time "
                    "per call by kernel (ncu without ncu: it segfaulted in sessions 10, 13, 17)")
    ap.add_argument("--dump_hlo", default=None, metavar="DIR",
                    help="write each case's compiled (optimised) HLO to DIR: which XLA fusion "
                    "is which kernel of an ncu or trace_summary table")
    args = ap.parse_args()

    official = {}
    if args.official and os.path.exists(args.official):
        official = json.load(open(args.official))
    shapes = [(t, s) for t, s in PREFILL_SHAPES.items() if t in args.shapes.split(",")]
    if args.smoke:
        shapes = [("smoke", (1, 128, 2))]
    cases = [(t, s, 1, 64) for t, s in shapes]
    if args.mimo:
        mimo_chunks = [int(c) for c in args.mimo_chunks.split(",")]
        cases += [(t + "_mimo" + ("" if c == 16 else f"_c{c}"), s, 4, c)
                  for t, s in shapes if t == "a" for c in mimo_chunks]
    rows = []
    for tag, (B, L, H), R, chunk in cases:
        N, P = (32, 16) if args.smoke else (128, 64)
        sets = [official_like_inputs(s, B, L, H, N=N, P=P, R=R) for s in range(2)]
        douts = [jax.random.normal(jax.random.PRNGKey(9 + s), (B, L, H, P)).astype(bf16)
                 for s in range(2)]
        off = official.get("prefill", {}).get(f"{tag}_B{B}_L{L}_H{H}", {})
        ref = None
        for name, core in impls(args).items():
            chunk = chunk if not args.smoke else 16 // R
            f = layer_fn(functools.partial(core, chunk_size=chunk))
            for mode in args.modes.split(","):
                try:
                    if mode == "fwd":
                        fn = jax.jit(f)
                        ms = timeit(fn, [(d,) for d in sets], args.reps)
                        o = fn(sets[0]).astype(f32)
                        ref = o if ref is None else ref
                        note = f"diff {float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref)):.1e}"
                    else:
                        fn = jax.jit(fwd_bwd(f))
                        ms = timeit(fn, list(zip(sets, douts, strict=True)), args.reps)
                        note = ""
                    call = (sets[0],) if mode == "fwd" else (sets[0], douts[0])  # one call
                    if args.profile:
                        profiled(fn, call)
                    if args.trace:
                        print(f"== trace: {tag} {name} {mode}\n" + traced(fn, call, args.trace),
                              flush=True)
                    if args.dump_hlo:
                        os.makedirs(args.dump_hlo, exist_ok=True)
                        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{tag}_{name}_{mode}")
                        with open(os.path.join(args.dump_hlo, label + ".hlo.txt"), "w") as fh:
                            fh.write(fn.lower(*call).compile().as_text())
                except Exception as e:  # keep going: report the failure in its row
                    ms, note = None, f"FAILED {type(e).__name__}: {str(e)[:300]}"
                o_ms = off.get("fwd_infer_ms" if mode == "fwd" else "fwd_bwd_ms")
                row = dict(shape=f"{tag} B{B} L{L} H{H} R{R}", impl=name, mode=mode, ms=ms,
                           official_ms=o_ms, speedup=(o_ms / ms) if (ms and o_ms) else None,
                           note=note)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        json.dump(dict(device=str(jax.devices()[0].device_kind), rows=rows,
                       refs=official.get("refs")), open(args.json, "w"), indent=1)
    print(f"\n{'shape':24} {'impl':28} {'mode':8} {'ms':>8} {'official':>8} {'x':>6}")
    for r in rows:
        ms = "FAIL" if r["ms"] is None else f"{r['ms']:.3f}"
        o = "-" if r["official_ms"] is None else f"{r['official_ms']:.3f}"
        x = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        print(f"{r['shape']:24} {r['impl'][:28]:28} {r['mode']:8} {ms:>8} {o:>8} {x:>6}")
    if official.get("refs"):
        print("refs:", official["refs"])


if __name__ == "__main__":
    main()
