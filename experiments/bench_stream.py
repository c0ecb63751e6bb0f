"""How fast can a kernel stream the decode state? (issue 10, item 2: the step at >= 95% of the
copy rate.) The same update h <- h * a + 1 (float32 arithmetic, h in its own dtype) of a
(B, H, P, N) decode state, written three ways and timed side by side in one process:

- `xla`: a jitted elementwise expression, state donated (XLA's fusion);
- `triton bp:warps`: Pallas Triton, one program per (P block, head, batch), the decode kernel's
  grid and launch shapes (`decode_step.pallas_triton.DecodeBlocks`), h aliased in place;
- `mosaic bp:stages:seq`: Pallas Mosaic GPU, TMA copies of (bp, N) tiles into shared memory and
  back to a new buffer (no aliasing in `plgpu.kernel`; XLA streams donated and fresh buffers at
  one rate); `seq` is what a CTA walks with `stages` copies in flight
  (`-`: none, one tile a CTA; `p`: the head's P blocks; `h`: every head of a batch row, one CTA
  per batch row: a persistent, pipelined stream).

The decode kernel does this and more (the rank-1 updates, the readout's reduction, the
rotation), so the fastest form here bounds what a decode kernel written that way can reach,
and says which backend issue 10's 95% needs. The Triton form also takes steps of that work
(`bp:warps:work`): `update` adds the two rank-1 terms per head (h a + u k_prev^T + v k^T, with
u, v per row and k_prev, k per head loaded as the step loads them) and `readout` also the row
sums y = h' q; the decode kernel's time beyond `readout`'s is its rotation, small loads and
epilogue.

    PYTHONPATH=. python experiments/bench_stream.py            # GPU, ~2 min
    PYTHONPATH=. python experiments/bench_stream.py --smoke --mosaic ""   # CPU: tiny, interpreted
    (jax's Mosaic GPU interpreter cannot run `emit_pipeline`'s predicated copies: on the CPU the
    Mosaic forms are only lowered, tests/experiments/test_bench_stream.py)

Timing as `bench_decode_step.py`: `--steps` updates chained in one jitted call (state
donated; an optimisation barrier between updates, or XLA fuses them into one pass), `--calls`
calls back to back, median of `--reps`, per update; "% copy" is the state's bytes read and
written over the fastest device copy measured in the same run. Results in docs/benchmarks.md
("Decode step alone", session 15).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba3_jax.benchmark import announce_ceilings, markdown_table  # noqa: E402
from pallas_kernels._compat import SQ, compiler_params  # noqa: E402

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - a jax without Mosaic GPU
    plgpu = None

f32 = jnp.float32
DECAY = 0.999  # the update's factor: any value the compiler cannot fold away


WORKS = ("stream", "update", "readout")


def _update(h):
    return (h.astype(f32) * DECAY + 1.0).astype(h.dtype)


def vectors(key, B: int, H: int, P: int, N: int) -> dict:
    """The per-head rows and columns of the `update` and `readout` work: u, v (B, H, P) and k_prev,
    k, q (B, H, N), float32 (the decode step's beta x_prev, gamma x and its rotated vectors)."""
    ks = jax.random.split(key, 5)
    shapes = dict(u=(B, H, P), v=(B, H, P), kp=(B, H, N), k=(B, H, N), q=(B, H, N))
    return {name: jax.random.normal(k_, shape, f32)
            for k_, (name, shape) in zip(ks, shapes.items(), strict=True)}


def reference(h, vec: dict, work: str):
    """(new h, readout or None): `stream` is h * a + 1; `update` h * a + u kp^T + v k^T per head
    (the decode step's rank-1 terms); `readout` also y = h' q per row."""
    if work == "stream":
        return _update(h), None
    new = (h.astype(f32) * DECAY + vec["u"][..., None] * vec["kp"][..., None, :]
           + vec["v"][..., None] * vec["k"][..., None, :])
    y = jnp.sum(new * vec["q"][..., None, :], axis=-1) if work == "readout" else None
    return new.astype(h.dtype), y


def xla_update(h, vec):
    return reference(h, vec, "stream")


def _tile_kernel(h_ref, o_ref):
    o_ref[...] = _update(h_ref[...])


def _work_kernel(h_ref, u_ref, v_ref, kp_ref, k_ref, q_ref, o_ref, *y_ref):
    new = (h_ref[...].astype(f32) * DECAY + u_ref[...][:, None] * kp_ref[...][None, :]
           + v_ref[...][:, None] * k_ref[...][None, :])
    o_ref[...] = new.astype(o_ref.dtype)
    if y_ref:
        y_ref[0][...] = jnp.sum(new * q_ref[...][None, :], axis=1)


def triton_update(h, vec, bp: int, warps: int, work: str = "stream", interpret: bool = False):
    """One program per (P block, head, batch), the decode kernel's order (memory order of h);
    `work` as `reference`, h aliased in place."""
    B, H, P, N = h.shape
    grid = (P // bp, H, B)
    spec = pl.BlockSpec((SQ, SQ, bp, N), lambda p, hh, b: (b, hh, p, 0))
    params = dict(interpret=interpret, name=f"stream_triton_{work}",
                  compiler_params=None if interpret else compiler_params(warps, 1))
    out_h = jax.ShapeDtypeStruct(h.shape, h.dtype)
    if work == "stream":
        return pl.pallas_call(_tile_kernel, grid=grid, in_specs=[spec], out_specs=spec,
                              out_shape=out_h, input_output_aliases={0: 0}, **params)(h), None
    rows = pl.BlockSpec((SQ, SQ, bp), lambda p, hh, b: (b, hh, p))
    cols = pl.BlockSpec((SQ, SQ, N), lambda p, hh, b: (b, hh, 0))
    readout = work == "readout"
    outs = pl.pallas_call(
        _work_kernel, grid=grid, in_specs=[spec, rows, rows, cols, cols, cols],
        out_specs=[spec] + ([rows] if readout else []),
        out_shape=[out_h] + ([jax.ShapeDtypeStruct((B, H, P), f32)] if readout else []),
        input_output_aliases={0: 0}, **params,
    )(h, vec["u"], vec["v"], vec["kp"], vec["k"], vec["q"])
    return outs[0], (outs[1] if readout else None)


def mosaic_update(h, vec, bp: int, stages: int, seq: str, interpret: bool = False):
    """Mosaic GPU (`plgpu.kernel`): each CTA streams its rows through shared memory in (bp, N)
    tiles by TMA, `plgpu.emit_pipeline` keeping `stages` tiles in flight. seq '-': one tile a
    CTA (B H P / bp CTAs); 'p': a head's P blocks a CTA (B H CTAs); 'h': a batch row's heads and
    P blocks a CTA (B CTAs: a persistent stream). The result is a new buffer (pallas_call's
    in-place aliasing is gone from jax 0.11 for Mosaic GPU; XLA's donated and fresh-buffer
    updates stream at the same rate, `benchmark.measure_copy_rates`)."""
    if plgpu is None:
        raise RuntimeError("this jax has no Pallas Mosaic GPU")
    B, H, P, N = h.shape
    nb = P // bp
    steps = {"-": 1, "p": nb, "h": H * nb}[seq]
    ctas = B * H * nb // steps
    spec = pl.BlockSpec((bp, N), lambda j: (j, 0))

    def tile(_, h_s, o_s):
        o_s[...] = _update(h_s[...])

    def kernel(h_g, o_g):
        i = jax.lax.axis_index("i")
        plgpu.emit_pipeline(tile, grid=(steps,), in_specs=[spec], out_specs=[spec],
                            max_concurrent_steps=stages)(h_g.at[i], o_g.at[i])

    rows = h.reshape(ctas, steps * bp, N)
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        mode = InterpretGPUParams()
    else:
        mode = None
    out = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(rows.shape, rows.dtype), grid=(ctas,),
        grid_names=("i",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=mode)(rows)
    return out.reshape(h.shape), None


def variants(triton: str, mosaic: str, interpret: bool) -> dict:
    """{label: (update fn, work)} from 'bp:warps[:work],...' and 'bp:stages:seq,...' ('P' = all
    rows; work one of WORKS, `stream` by default)."""
    out = {"xla": (xla_update, "stream")}

    def rows(bp, P):  # capped at P (the CPU smoke's P is 16)
        return P if bp == "P" else min(int(bp), P)

    for spec in filter(None, triton.split(",")):
        bp, warps, *work = spec.split(":")
        work = work[0] if work else "stream"
        if work not in WORKS:
            raise SystemExit(f"bad triton variant {spec!r}: work must be one of {WORKS}")
        out[f"triton {spec}"] = (lambda h, vec, bp=bp, w=int(warps), wk=work: triton_update(
            h, vec, rows(bp, h.shape[2]), w, wk, interpret), work)
    for spec in filter(None, mosaic.split(",")):
        bp, stages, seq = spec.split(":")
        if seq not in ("-", "p", "h"):
            raise SystemExit(f"bad mosaic variant {spec!r}: seq must be -, p or h")
        out[f"mosaic {spec}"] = (lambda h, vec, bp=bp, s=int(stages), q=seq: mosaic_update(
            h, vec, rows(bp, h.shape[2]), s, q, interpret), "stream")
    return out


def chained(update, steps: int):
    """jit of `steps` updates in a row (h donated), returning h and every readout."""
    def run(h, vec):
        ys = []
        for _ in range(steps):  # the barrier keeps XLA from fusing the steps into one pass
            h, y = jax.lax.optimization_barrier(update(h, vec))
            ys.append(y)
        return h, ys

    return jax.jit(run, donate_argnums=0)


def time_update(update, work: str, h0, vec, steps: int, calls: int, reps: int):
    """(us per update, max abs error of one update's h and readout against `reference`)."""
    want_h, want_y = reference(h0, vec, work)
    got_h, got_y = jax.jit(update)(jnp.copy(h0), vec)
    err = float(jnp.max(jnp.abs(got_h.astype(f32) - want_h.astype(f32))))
    if want_y is not None:
        err = max(err, float(jnp.max(jnp.abs(got_y - want_y)) / jnp.max(jnp.abs(want_y))))
    run = chained(update, steps)
    h, _ = run(jnp.copy(h0), vec)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            h, ys = run(h, vec)
        jax.block_until_ready((h, ys))
        times.append((time.perf_counter() - t0) / calls)
    return 1e6 * float(np.median(times)) / steps, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d_states", default="128,64")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--triton", default="16:2,32:4,P:4,P:8")
    ap.add_argument("--mosaic", default="P:1:-,32:2:p,16:4:p,P:2:h,32:4:h,16:4:h")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU)")
    args = ap.parse_args(argv)
    B, H, P = (2, 2, 16) if args.smoke else (128, 64, 64)
    if args.smoke:
        args.steps, args.calls, args.reps = 2, 1, 1
    ceil = announce_ceilings(smoke=args.smoke)
    fns = variants(args.triton, args.mosaic, interpret=args.smoke)
    out = os.environ.get("OUT")
    rows = []
    for N in (16,) if args.smoke else [int(n) for n in args.d_states.split(",")]:
        for dtype in args.dtypes.split(","):
            h0 = jax.random.normal(jax.random.PRNGKey(N), (B, H, P, N), dtype)
            vec = vectors(jax.random.PRNGKey(N + 1), B, H, P, N)
            nbytes = 2 * h0.size * h0.dtype.itemsize  # the state's; the vectors add 1-2%
            for label, (fn, work) in fns.items():
                try:
                    us, err = time_update(fn, work, h0, vec, args.steps, args.calls, args.reps)
                    pct = 100 * nbytes / (us * 1e-6) / ceil.copy
                    row = {"N": N, "dtype": dtype, "impl": label, "us": us, "pct_copy": pct,
                           "floor_us": 1e6 * nbytes / ceil.copy, "err": err}
                except Exception as e:  # a variant this jax or device cannot build
                    row = {"N": N, "dtype": dtype, "impl": label,
                           "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if out:  # every row as it comes (a device fault ends the process)
                    with open(os.path.join(out, "bench_stream.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(markdown_table(
        ["N", "dtype", "implementation", "us", "% copy", "floor us", "max err / error"],
        [[r["N"], r["dtype"], r["impl"], f"{r['us']:.1f}" if "us" in r else "-",
          f"{r['pct_copy']:.0f}%" if "us" in r else "-",
          f"{r['floor_us']:.1f}" if "us" in r else "-",
          f"{r['err']:.1e}" if "us" in r else r["error"]] for r in rows]))
    return rows


if __name__ == "__main__":
    main()
