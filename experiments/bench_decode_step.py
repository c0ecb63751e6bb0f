"""The SSM decode step alone (issue 10, item 2): the XLA step and each variant of the Pallas
decode kernel side by side in one process, against the device's copy bandwidth.

    PYTHONPATH=. python experiments/bench_decode_step.py          # GPU, ~2 min; JSON to $OUT
    PYTHONPATH=. python experiments/bench_decode_step.py --official .official   # + official step
    PYTHONPATH=. python experiments/bench_decode_step.py --smoke  # CPU: tiny, interpreted

Shapes: B=128 H=64 P=64, N in {128, 64}, state (and activations) float32 or bfloat16, SISO and
MIMO R=4, one B/C group with per-head biases (as the layer passes them). One step is what
`Mamba3.step` runs between in_proj and out_proj: the SSM step and the gate epilogue.

Timing: `--steps` steps chained in one jitted call (state donated, so it is updated in place; a
different input set per step; every step's output returned so nothing is dead code; an
optimisation barrier between steps, since session 15: without it XLA may fuse consecutive XLA
steps into one pass over the state, which a generation loop cannot do), `--calls`
such calls dispatched back to back, median over `--reps`, divided by the steps: device time per
step, as a CUDA-graph timing sees it. Each variant's outputs and final state after its first
call are compared with the XLA step's (max relative error, over all chained steps), and the
compiled chain is searched for copies of a state-sized buffer (0 = the in-place update worked).

Floor: the bytes one step must move (the state read and written, inputs, output, parameters)
over the fastest device copy measured in this run (`mamba3_jax.benchmark.measure_ceilings`);
"% copy bw" is that floor over the time. `--official DIR` (a tree made by
`../shared/bench/official/setup_tree.sh`) also times the official Triton step
(`mamba3_siso_step`, SISO, float32 state) at the same shapes under a torch CUDA graph.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba3_jax.benchmark import (  # noqa: E402
    announce_ceilings,
    device_name,
    git_commit,
    markdown_table,
    percent_of_floor,
    tree_nbytes,
)
from mamba3_jax.ops.ssm import (  # noqa: E402
    SSMState,
    lift,
    ssm_step,
    step_start,
)
from pallas_kernels import DecodeBlocks, decode_step  # noqa: E402
from pallas_kernels.decode_step.pallas_triton import parse_blocks  # noqa: E402
from pallas_kernels.decode_step.reference import reference_step  # noqa: E402
from pallas_kernels.decode_step.shapes import STEP_D_STATES, STEP_SHAPE  # noqa: E402

f32 = jnp.float32
# block_p:num_warps[:noevict][:xlatrig]; "P" = all rows of the state per program; xlatrig =
# the new angle's cos / sin from XLA (`DecodeBlocks.xla_trig`)
# the xla_trig shapes with <= 56 registers (16:4, 8:2; offline compile_check) are session 11's
# candidates for occupancy: its ncu pass put the N = 128 kernels at 36-42% occupancy (72-80
# registers) with long-scoreboard stalls (docs/kernels.md, "Decode step")
DEFAULT_VARIANTS = ("P:4,32:4,16:2,16:4,8:2,P:4:noevict,"
                    "P:4:xlatrig,32:4:xlatrig,16:2:xlatrig,32:2:xlatrig,16:1:xlatrig,"
                    "16:4:xlatrig,8:2:xlatrig,32:4:fasttrig")


def parse_variants(spec: str) -> list[DecodeBlocks]:
    return [parse_blocks(item) for item in spec.split(",")]


def make_step(key, B, H, P, N, R, dtype, state_dtype):
    """(state, inputs dict, params dict) of one decode step, random, layer-like magnitudes."""
    S = N // 4
    ks = jax.random.split(key, 16)
    nrm = lambda k, s, sc=1.0: sc * jax.random.normal(k, s, f32)  # noqa: E731
    dt = jax.nn.softplus(nrm(ks[0], (B, H)) - 2.0)
    lam = jax.nn.sigmoid(nrm(ks[1], (B, H)))
    inp = dict(q=nrm(ks[2], (B, R, 1, N)).astype(dtype), k=nrm(ks[3], (B, R, 1, N)).astype(dtype),
               x=nrm(ks[4], (B, H, P)).astype(dtype), z=nrm(ks[5], (B, H, P)).astype(dtype),
               angle_inc=jnp.pi * jnp.tanh(nrm(ks[6], (B, H, S))) * dt[..., None],
               log_decay=-jnp.exp(nrm(ks[7], (B, H), 0.5)) * dt, gamma=lam * dt,
               eta=(1 - lam) * dt)
    prm = dict(D=nrm(ks[8], (H,)), q_bias=1.0 + nrm(ks[9], (H, R, N), 0.1),
               k_bias=1.0 + nrm(ks[10], (H, R, N), 0.1))
    if R > 1:
        prm.update(mimo_x=1.0 / R + nrm(ks[11], (H, R, P), 0.1),
                   mimo_z=1.0 + nrm(ks[12], (H, R, P), 0.1),
                   mimo_o=1.0 / R + nrm(ks[13], (H, R, P), 0.1))
    state = SSMState(angle=jax.random.uniform(ks[14], (B, H, S), f32, 0, 6.0),
                     h=nrm(ks[15], (B, H, P, N), 0.3).astype(state_dtype),
                     k_prev=nrm(ks[3], (B, R, H, N), 0.5).astype(dtype),
                     x_prev=nrm(ks[4], (B, H, P)).astype(dtype))
    return state, inp, prm


def ssm_step_einsum(state, q, k, x, angle_inc, log_decay, gamma, eta, reset=None,
                    mimo_x=None):
    """`ssm_step` as it was until session 9: the rank sums and the readout as float32 einsums
    (kept to time the two side by side)."""
    hp = jax.lax.Precision.HIGHEST
    state, angle, qr, kr = step_start(state, q, k, angle_inc, reset)
    alpha = jnp.exp(log_decay)
    kv_prev = jnp.einsum("brhp,brhn->bhpn", lift(state.x_prev, mimo_x),
                         state.k_prev.astype(f32), precision=hp)
    kv = jnp.einsum("brhp,brhn->bhpn", lift(x, mimo_x), kr.astype(f32), precision=hp)
    h = (alpha[..., None, None] * state.h.astype(f32)
         + (eta * alpha)[..., None, None] * kv_prev + gamma[..., None, None] * kv)
    y = jnp.einsum("bhpn,brhn->brhp", h, qr, precision=hp)
    return y, SSMState(angle=angle, h=h.astype(state.h.dtype), k_prev=kr,
                       x_prev=x.astype(state.x_prev.dtype))


XLA_FORMS = {"xla step": ssm_step, "xla einsum step": ssm_step_einsum}


def xla_step(state, inp, prm, form=ssm_step):
    """The XLA decode step (the 'reference' backend at L = 1; `decode_step.reference`), with
    `form` as its SSM step."""
    return reference_step(state, inp["q"], inp["k"], inp["x"], inp["z"], inp["angle_inc"],
                          inp["log_decay"], inp["gamma"], inp["eta"], None, D=prm["D"],
                          mimo_x=prm.get("mimo_x"), mimo_z=prm.get("mimo_z"),
                          mimo_o=prm.get("mimo_o"), q_bias=prm["q_bias"], k_bias=prm["k_bias"],
                          step=form)


def kernel_step(blocks: DecodeBlocks, interpret: bool):
    def step(state, inp, prm):
        return decode_step(state, inp["q"], inp["k"], inp["x"], inp["z"], inp["angle_inc"],
                           inp["log_decay"], inp["gamma"], inp["eta"], None, D=prm["D"],
                           mimo_x=prm.get("mimo_x"), mimo_z=prm.get("mimo_z"),
                           mimo_o=prm.get("mimo_o"), q_bias=prm["q_bias"], k_bias=prm["k_bias"],
                           blocks=blocks, interpret=interpret)

    return step


def chained(step):
    """jit of len(inps) steps in a row, state donated; returns (state, every step's output)."""

    def run(state, inps, prm):
        outs = []
        for inp in inps:
            # the barrier keeps XLA from fusing one step's state update into the next step's
            # (a pass over h for two steps): generation runs steps in a loop, one at a time
            out, state = jax.lax.optimization_barrier(step(state, inp, prm))
            outs.append(out)
        return state, outs

    return jax.jit(run, donate_argnums=0)


def state_copies(hlo: str, h) -> int:
    """Instructions of compiled HLO text that copy a buffer shaped like the state h (a copy
    op, or a fusion named for one)."""
    dt = {"float32": "f32", "bfloat16": "bf16"}[jnp.dtype(h.dtype).name]
    shape = f"{dt}[{','.join(str(d) for d in h.shape)}]"
    count = 0
    for line in hlo.splitlines():
        name, _, rhs = line.partition(" = ")
        if rhs.startswith(shape) and (" copy(" in rhs or "copy" in name):
            count += 1
    return count


def rel_err(a, b) -> float:
    a, b = (np.asarray(jnp.asarray(v, f32), np.float64) for v in (a, b))
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def time_variant(step, state0, inps, prm, calls: int, reps: int):
    """(us per step, state-sized copies in the compiled chain, (outputs, state) of its first
    call from state0)."""
    run = chained(step)
    state = jax.tree.map(jnp.copy, state0)
    compiled = run.lower(state, inps, prm).compile()
    copies = state_copies(compiled.as_text(), state0.h)
    state, outs = compiled(state, inps, prm)
    first = (jnp.stack(outs), jnp.copy(state.h).astype(f32))  # the next call donates state
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            state, outs = compiled(state, inps, prm)
        jax.block_until_ready((state, outs))
        times.append((time.perf_counter() - t0) / calls)
    return 1e6 * float(np.median(times)) / len(inps), copies, first


def time_official(official_dir: str, B, H, P, N) -> float:
    """us of the official `mamba3_siso_step` (bf16 inputs, float32 state) under a CUDA graph."""
    import torch
    import triton.testing

    sys.path.insert(0, os.path.abspath(official_dir))
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_step import mamba3_siso_step

    S = N // 4
    g = torch.Generator(device="cuda").manual_seed(0)
    rn = lambda *s, dtype=torch.bfloat16: torch.randn(  # noqa: E731
        *s, device="cuda", generator=g).to(dtype)
    dt = 0.01 + 0.09 * torch.rand(B, H, device="cuda", generator=g)
    args = dict(Q=rn(B, 1, N), K=rn(B, 1, N), V=rn(B, H, P), ADT=-dt, DT=dt,
                Trap=rn(B, H), Q_bias=rn(H, N, dtype=torch.float32),
                K_bias=rn(H, N, dtype=torch.float32), Angles=rn(B, H, S, dtype=torch.float32),
                D=rn(H, dtype=torch.float32), Z=rn(B, H, P))
    states = (rn(B, H, S, dtype=torch.float32), rn(B, H, P, N, dtype=torch.float32),
              rn(B, H, N, dtype=torch.float32), rn(B, H, P, dtype=torch.float32))
    fn = lambda: mamba3_siso_step(**args, Input_States=states)  # noqa: E731
    fn()  # autotunes
    torch.cuda.synchronize()
    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    except TypeError:  # older triton
        ms = triton.testing.do_bench_cudagraph(fn, rep=200, quantiles=[0.5])
    return 1e3 * float(ms)


COLUMNS = ["N", "state", "R", "implementation", "us / step", "% copy bw", "floor us (MB)",
           "state-only floor us", "copies", "max rel err vs xla (outs, h)"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=STEP_SHAPE["B"])
    ap.add_argument("--heads", type=int, default=STEP_SHAPE["H"])
    ap.add_argument("--headdim", type=int, default=STEP_SHAPE["P"])
    ap.add_argument("--d_states", default=",".join(str(n) for n in STEP_D_STATES))
    ap.add_argument("--dtypes", default="float32,bfloat16", help="state (and activation) dtypes")
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="kernel variants, comma-separated "
                         "block_p:num_warps[:noevict][:xlatrig][:fasttrig]")
    ap.add_argument("--xla_forms", default="xla einsum step",
                    help=f"other XLA step formulations beside 'xla step': {sorted(XLA_FORMS)}")
    ap.add_argument("--steps", type=int, default=8, help="chained steps per call")
    ap.add_argument("--calls", type=int, default=8, help="calls dispatched back to back")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--official", default="", help="official tree: also time mamba3_siso_step")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU)")
    ap.add_argument("--once", action="store_true",
                    help="no ceilings, no timing: run each step chain once (under ncu: "
                         f"ncu --clock-control none --csv --metrics $(python {__file__} "
                         "--ncu_metrics) -k regex:'mamba3_decode|fusion' python ... --once)")
    ap.add_argument("--ncu_metrics", action="store_true", help="print NCU_METRICS and stop")
    args = ap.parse_args(argv)
    if args.ncu_metrics:
        print(NCU_METRICS)
        return []
    B, H, P = args.batch, args.heads, args.headdim
    if args.smoke:
        B, H, P, args.steps, args.calls, args.reps = 2, 2, 16, 2, 1, 1
        args.d_states = "32" if args.d_states == ap.get_default("d_states") else args.d_states
        if args.variants == DEFAULT_VARIANTS:
            args.variants = "P:4,8:2"
    elif jax.default_backend() not in ("gpu", "cuda"):
        sys.exit("the benchmark needs a GPU (use --smoke on the CPU)")
    variants = parse_variants(args.variants)
    t_start = time.perf_counter()
    if args.once:
        return run_once(args, B, H, P, variants)
    ceil = announce_ceilings(args.smoke)

    rows = []
    for n, dtype, R, (state0, inps, prm) in cases(args, B, H, P):
        step_bytes = (2 * tree_nbytes(state0) + tree_nbytes(inps[0]) + tree_nbytes(prm)
                      + B * H * P * 4)
        floor_us = 1e6 * ceil.floor_s(step_bytes)
        state_floor_us = 1e6 * ceil.floor_s(2 * tree_nbytes(state0.h))
        impls = [(name, functools.partial(xla_step, form=XLA_FORMS[name]))
                 for name in ["xla step"] + [f for f in args.xla_forms.split(",") if f]]
        impls += [
            (f"kernel {v.label()}", kernel_step(v, args.smoke)) for v in variants]
        if args.official and R == 1 and dtype == "float32":
            impls.append(("official triton step", None))
        want = None  # the XLA chain's outputs and final state: the reference
        for label, step in impls:
            r = dict(N=n, state=dtype, R=R, impl=label, us=None, pct=None,
                     floor_us=floor_us, bytes=step_bytes, state_floor_us=state_floor_us,
                     copies=None, err="-")
            try:
                if step is None:
                    r["us"] = time_official(args.official, B, H, P, n)
                else:
                    us, r["copies"], got = time_variant(step, state0, inps, prm,
                                                        args.calls, args.reps)
                    want = want or got
                    r["err"] = ", ".join(f"{rel_err(g, w):.1e}"
                                         for g, w in zip(got, want, strict=True))
                    r["us"] = us
                r["pct"] = percent_of_floor(r["us"], floor_us)
            except Exception as e:  # report and go on with the other variants
                r["err"] = f"FAILED {type(e).__name__}: {str(e)[:200]}"
            rows.append(r)
            print(f"[{time.perf_counter() - t_start:.0f}s] " + " | ".join(
                str(c) for c in table_row(r)), flush=True)

    table = markdown_table(COLUMNS, [table_row(r) for r in rows])
    intro = (f"Device: {device_name()}; jax {jax.__version__}; commit {git_commit()}; "
             f"B={B} H={H} P={P}; {args.steps} chained steps per call, {args.calls} calls, "
             f"median of {args.reps}; ceilings: {ceil.summary()}; "
             f"{time.perf_counter() - t_start:.0f} s in all.")
    print("\n" + intro + "\n\n" + table + "\n" + best_summary(rows), flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_decode_step.json"), "w") as f:
            json.dump(dict(device=device_name(), jax=jax.__version__, commit=git_commit(),
                           args=vars(args), ceilings=dict(copy=ceil.copy, matmul=ceil.matmul,
                                                          copies=ceil.copies),
                           rows=rows), f, indent=1, default=str)
    return rows


# Nsight Compute metrics of `--once`: time, registers, occupancy (what the registers allow and
# what was reached), DRAM bytes and throughput, issue activity and the main stall reasons (warps
# stalled per issued instruction): tells a step bound by latency (long scoreboard at low
# occupancy) from one bound by issue or by DRAM.
NCU_METRICS = ",".join([
    "gpu__time_duration.sum", "launch__registers_per_thread", "launch__grid_size",
    "launch__occupancy_limit_registers", "sm__maximum_warps_per_active_cycle_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active", "dram__bytes_read.sum",
    "dram__bytes_write.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "smsp__issue_active.avg.pct_of_peak_sustained_active", "smsp__inst_executed.sum",
] + [f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio"
     for r in ("long_scoreboard", "lg_throttle", "barrier", "wait", "short_scoreboard",
               "mio_throttle", "math_pipe_throttle", "drain", "not_selected", "no_instruction")])


def cases(args, B, H, P):
    """(N, dtype, R, (state, steps' inputs, params)) of every case the arguments ask for, the
    same random problem per case in the timed run and in `--once`."""
    for n in (int(s) for s in args.d_states.split(",")):
        for dtype in args.dtypes.split(","):
            for R in (int(s) for s in args.ranks.split(",")):
                dt = jnp.dtype(dtype)
                keys = jax.random.split(jax.random.PRNGKey(n * 10 + R), args.steps + 1)
                state0, _, prm = make_step(keys[0], B, H, P, n, R, dt, dt)
                inps = [make_step(k, B, H, P, n, R, dt, dt)[1] for k in keys[1:]]
                yield n, dtype, R, (state0, inps, prm)


def run_once(args, B, H, P, variants) -> list:
    """Each (N, dtype, R) case's XLA step and kernel variants: one chained call each, outputs
    checked against the XLA step's (the `--once` pass that ncu profiles)."""
    rows = []
    for n, dtype, R, (state0, inps, prm) in cases(args, B, H, P):
        impls = [("xla step", xla_step)] + [
            (f"kernel {v.label()}", kernel_step(v, args.smoke)) for v in variants]
        want = None
        for label, step in impls:
            state = jax.tree.map(jnp.copy, state0)  # the chain donates its state
            _, outs = jax.block_until_ready(chained(step)(state, inps, prm))
            want = want or outs
            err = max(rel_err(g, w) for g, w in zip(outs, want, strict=True))
            rows.append(dict(N=n, state=dtype, R=R, impl=label, err=err))
            print(f"once: N={n} {dtype} R={R} {label}: max rel err {err:.1e}", flush=True)
    return rows


def table_row(r: dict) -> list:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    return [r["N"], r["state"], r["R"], r["impl"], fmt(r["us"], ".1f"), fmt(r["pct"], ".1f"),
            f"{r['floor_us']:.1f} ({r['bytes'] / 1e6:.0f})", f"{r['state_floor_us']:.1f}",
            fmt(r["copies"], "d"), r["err"]]


def best_summary(rows: list[dict]) -> str:
    """Per shape: the fastest kernel variant, its % of copy bandwidth, vs the XLA step."""
    lines = []
    shapes = sorted({(r["N"], r["state"], r["R"]) for r in rows}, key=str)
    for shape in shapes:
        rs = [r for r in rows if (r["N"], r["state"], r["R"]) == shape and r["pct"]]
        kern = [r for r in rs if r["impl"].startswith("kernel")]
        if not kern:
            continue
        best = min(kern, key=lambda r: r["us"])
        others = ", ".join(f"{r['impl']} {r['us']:.1f} us" for r in rs
                           if not r["impl"].startswith("kernel"))
        lines.append(f"N={shape[0]} {shape[1]} R={shape[2]}: best {best['impl']} "
                     f"{best['us']:.1f} us ({best['pct']:.1f}% of copy bw); {others}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
