"""Benchmark of the Pallas kernels against the XLA forms, with rooflines, in one run on a GPU.

    PYTHONPATH=. python -m pallas_kernels.bench                 # everything (make bench-kernels)
    PYTHONPATH=. python -m pallas_kernels.bench --what fwd,decode --reps 30
    PYTHONPATH=. python -m pallas_kernels.bench --smoke         # tiny shapes, interpret on CPU

Measures first the device's copy bandwidth (large device-to-device copy, bytes read + written)
and bf16 matmul rate (8192^3), then times each case as the median over `--reps` repetitions of
`--inner` back-to-back calls (after warm-up, inputs rotated over `--sets` copies), each followed
by `jax.block_until_ready`. Each row shows its floor: max(bytes / bandwidth, FLOPs / matmul rate)
with bytes the fewest a fused implementation must move (inputs once, outputs once) and FLOPs
those of the chunked algorithm. `--write-docs` replaces the "Pallas kernels" section of
docs/benchmarks.md with the table. Depends on jax/numpy and this repository only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mamba3_jax import backends
from mamba3_jax.benchmark import git_commit as commit
from mamba3_jax.benchmark import publish
from mamba3_jax.ops.mixer import gate_output
from mamba3_jax.ops.ssm import SSMInputs, SSMState, ssm_step
from pallas_kernels import BlockSizes, chunked_core, decode_step

f32, bf16 = jnp.float32, jnp.bfloat16

# official Mamba-3 kernels on one H100, median ms (from the issue)
OFFICIAL = {
    ("fwd", 8, 2048, 32, 1): 0.562, ("fwd", 8, 2048, 64, 1): 0.944,
    ("fwd", 1, 16384, 64, 1): 2.609,
    ("fwd+bwd", 8, 2048, 32, 1): 2.135, ("fwd+bwd", 8, 2048, 64, 1): 4.029,
    ("fwd+bwd", 1, 16384, 64, 1): 7.310,
    ("decode", 128, 128): 0.208, ("decode", 128, 64): 0.102,
}


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    ms: Optional[float]
    floor_ms: Optional[float] = None
    official_ms: Optional[float] = None
    note: str = ""

    def cells(self):
        ms = "-" if self.ms is None else f"{self.ms:.3f}"
        floor = "-" if self.floor_ms is None else f"{self.floor_ms:.3f}"
        xf = "-" if (self.ms is None or not self.floor_ms) else f"{self.ms / self.floor_ms:.2f}"
        off = "-" if self.official_ms is None else f"{self.official_ms:.3f}"
        vs = ("-" if (self.ms is None or self.official_ms is None)
              else f"{self.official_ms / self.ms:.2f}x")
        return [self.case, self.impl, ms, floor, xf, off, vs, self.note]


HEADER = ["case", "implementation", "median ms", "floor ms", "x floor", "official ms",
          "speed-up vs official", "note"]


def table(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- timing


def timeit(fn: Callable, arg_sets, reps: int, inner: int, warmup: int = 2) -> float:
    """Median milliseconds of one call: `inner` back-to-back calls per sample, rotating inputs."""
    out = None
    for i in range(warmup):
        out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    samples = []
    for r in range(reps):
        t0 = time.perf_counter()
        for i in range(inner):
            out = fn(*arg_sets[(r * inner + i) % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples)


def measure_ceilings(reps: int, smoke: bool):
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    n = (1 << 16) if smoke else (1 << 30)  # bytes of bf16 per copy buffer
    xs = [jnp.full((n // 2,), i + 1, bf16) for i in range(2)]
    copy = jax.jit(lambda a: a + jnp.asarray(1, bf16))
    t = timeit(copy, [(a,) for a in xs], reps, 5)
    bw = 2 * n / (t * 1e-3)
    m = 256 if smoke else 8192
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    mats = [(jax.random.normal(ks[i], (m, m), bf16), jax.random.normal(ks[i + 1], (m, m), bf16))
            for i in range(2)]
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=f32).astype(bf16))
    t = timeit(mm, mats, reps, 5)
    return bw, 2 * m ** 3 / (t * 1e-3)


# ----------------------------------------------------------------------------- problems


def problem(seed, B, L, R, H, N, P, dtype=bf16, G=1):
    """Model-like inputs: group-level q, k (G groups) with per-head biases, dt-scaled scalars."""
    S = N // 4
    ks = jax.random.split(jax.random.PRNGKey(seed), 12)
    dt = jax.nn.softplus(jax.random.normal(ks[4], (B, L, H)) - 3.0)
    A = -jnp.exp(jax.random.normal(ks[5], (B, L, H)) * 0.5)
    lam = jax.nn.sigmoid(jax.random.normal(ks[6], (B, L, H)))
    inp = SSMInputs(
        q=(jax.random.normal(ks[0], (B, L, R, G, N)) * 0.3).astype(dtype),
        k=(jax.random.normal(ks[1], (B, L, R, G, N)) * 0.3).astype(dtype),
        x=jax.random.normal(ks[2], (B, L, H, P), dtype),
        angle_inc=(jnp.pi * jnp.tanh(jax.random.normal(ks[7], (B, L, S)))[:, :, None]
                   * dt[..., None]),
        log_decay=A * dt, gamma=lam * dt, eta=(1 - lam) * dt)
    if "q_bias" in SSMInputs._fields:
        inp = inp._replace(q_bias=jnp.ones((H, R, N), f32), k_bias=jnp.ones((H, R, N), f32))
    state = SSMState.zeros(B, H, P, N, S, R, dtype=dtype)
    params = dict(z=jax.random.normal(ks[3], (B, L, H, P), dtype), D=jnp.ones((H,), f32))
    if R > 1:
        params.update(mimo_x=jnp.full((H, R, P), 1.0 / R), mimo_z=jnp.ones((H, R, P)),
                      mimo_o=jnp.full((H, R, P), 1.0 / R))
    return inp, state, params


def per_head_inputs(inp: SSMInputs) -> SSMInputs:
    H = inp.x.shape[2]
    out = inp._replace(q=jnp.repeat(inp.q, H // inp.q.shape[3], axis=3),
                       k=jnp.repeat(inp.k, H // inp.k.shape[3], axis=3))
    if "q_bias" in SSMInputs._fields and inp.q_bias is not None:
        out = out._replace(
            q=(out.q.astype(f32) + jnp.swapaxes(inp.q_bias, 0, 1)).astype(inp.q.dtype),
            k=(out.k.astype(f32) + jnp.swapaxes(inp.k_bias, 0, 1)).astype(inp.k.dtype),
            q_bias=None, k_bias=None)
    return out


def bytes_fwd(B, L, R, H, N, P, G, itemsize=2, grad=False):
    """Fewest bytes: inputs read once, output written once; with the backward also the inputs
    read again, the output's cotangent read and a gradient written for every input."""
    S = N // 4
    inputs = (2 * B * L * R * G * N * itemsize  # q, k (per group)
              + 2 * B * L * H * P * itemsize  # x, z
              + B * L * H * S * 4 + 3 * B * L * H * 4)  # angle increments, log_decay, gamma, eta
    out = B * L * H * P * 4  # float32
    return 3 * inputs + 2 * out if grad else inputs + out


def flops_fwd(B, L, R, H, N, P, C):
    CR = C * R
    nc = -(-L // C)
    return B * H * nc * 2 * CR * (CR * (N + P) + 2 * N * P)


# ----------------------------------------------------------------------------- cases


def _kernel_fn(inp, state, p, *, chunk, interpret, blocks=None):
    return chunked_core(inp, state, chunk_size=chunk, interpret=interpret, blocks=blocks, **p)


def _xla_fn(form, inp, state, p, *, chunk):
    return backends.BACKENDS[form](inp, state, chunk_size=chunk, **p)


def _grad_fn(fn):
    """jit of the gradient of a scalar of (out, final h) w.r.t. every input (float leaves)."""
    def loss(inp, state, p):
        out, fin = fn(inp, state, p)
        return jnp.sum(out * out) * 1e-3 + jnp.sum(fin.h)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), allow_int=True))


def run_forward(rows, shapes, ceil, args, grad: bool):
    bw, mm = ceil
    for (B, L, H, R) in shapes:
        N, P, C = (32, 16, 16 // R) if args.smoke else (128, 64, 64 // R)
        sets = [problem(s, B, L, R, H, N, P) for s in range(args.sets)]
        name = f"{'fwd+bwd' if grad else 'fwd'} B={B} L={L} H={H} R={R}"
        flops = flops_fwd(B, L, R, H, N, P, C) * (3.5 if grad else 1.0)
        nbytes = bytes_fwd(B, L, R, H, N, P, 1, grad=grad)
        floor = max(nbytes / bw, flops / mm) * 1e3
        official = OFFICIAL.get(("fwd+bwd" if grad else "fwd", B, L, H, R))

        kernel_fn = functools.partial(_kernel_fn, chunk=C, interpret=args.smoke)
        impls = [("pallas (G=1, bias fused)", kernel_fn, False),
                 ("pallas (per-head q,k)", kernel_fn, True)]
        if grad:  # the two backward implementations side by side (BlockSizes.bwd)
            impls[0] = ("pallas fused bwd (G=1, bias fused)", kernel_fn, False)
            impls.insert(1, ("pallas split bwd (G=1, bias fused)", functools.partial(
                kernel_fn, blocks=BlockSizes(bwd="split")), False))
        impls.append(("xla chunked", functools.partial(_xla_fn, "chunked", chunk=C), False))
        hist_gb = B * L * H * P * N * 4 / 2 ** 30
        if hist_gb < 4:
            impls.append(("xla associative", functools.partial(_xla_fn, "associative", chunk=C),
                          False))
        else:
            rows.append(Row(name, "xla associative", None, floor, official,
                            f"skipped: needs {hist_gb:.0f} GiB for all h_t"))
        ref_out = None
        for impl, fn, per_head in impls:
            arg_sets = [((per_head_inputs(i) if per_head else i), s, p) for i, s, p in sets]
            f = _grad_fn(fn) if grad else jax.jit(fn)
            try:
                ms = timeit(f, arg_sets, args.reps, args.inner)
                note = ""
                if not grad:
                    out = f(*arg_sets[0])[0]
                    if ref_out is None:
                        ref_out = out
                    else:
                        err = float(jnp.linalg.norm((out - ref_out).astype(f32))
                                    / jnp.linalg.norm(ref_out.astype(f32)))
                        note = f"rel. diff vs first row {err:.1e}"
            except Exception as e:  # keep going: one failing case must not lose the others
                ms, note = None, f"FAILED: {type(e).__name__}: {str(e)[:120]}"
            rows.append(Row(name, impl, ms, floor, official, note))
            print(json.dumps(dataclasses.asdict(rows[-1])), flush=True)


def run_sweep(rows, ceil, args):
    """A few launch configurations of the kernels at the first shape."""
    B, L, H = (1, 64, 2) if args.smoke else (8, 2048, 32)
    N, P, C = (32, 16, 16) if args.smoke else (128, 64, 64)
    sets = [problem(s, B, L, 1, H, N, P) for s in range(args.sets)]
    configs = [(BlockSizes(num_warps_fwd=w, block_p=bp), False) for w in (4, 8)
               for bp in (None, 32)]
    configs += [(BlockSizes(num_warps_bwd=w, num_stages_bwd=s), True) for w, s in ((4, 1), (8, 2))]
    configs += [(BlockSizes(bwd="split", num_warps_bwd_chunk=wc, num_warps_bwd_state=ws,
                            block_p=bp), True)
                for wc, ws, bp in ((4, 4, None), (8, 8, None), (8, 4, 32))]
    for cfg, grad in configs:
        fn = functools.partial(_kernel_fn, chunk=C, interpret=args.smoke, blocks=cfg)
        f = _grad_fn(fn) if grad else jax.jit(fn)
        name = f"sweep {'fwd+bwd' if grad else 'fwd'} B={B} L={L} H={H}"
        if cfg.bwd == "split":
            label = (f"split bwd: warps_chunk={cfg.num_warps_bwd_chunk} "
                     f"warps_state={cfg.num_warps_bwd_state} block_p={cfg.block_p or P}")
        elif grad:
            label = f"warps_bwd={cfg.num_warps_bwd} stages_bwd={cfg.num_stages_bwd}"
        else:
            label = f"warps_fwd={cfg.num_warps_fwd} block_p={cfg.block_p or P}"
        try:
            ms, note = timeit(f, sets, args.reps, args.inner), ""
        except Exception as e:
            ms, note = None, f"FAILED: {type(e).__name__}: {str(e)[:120]}"
        rows.append(Row(name, "pallas " + label, ms, None, None, note))
        print(json.dumps(dataclasses.asdict(rows[-1])), flush=True)


def _decode_problem(Bt, H, P, N, R, sdt, sets):
    S = N // 4
    ks = jax.random.split(jax.random.PRNGKey(N + R), 10)

    def tok(i):
        kk = jax.random.split(ks[i], 8)
        dt = jax.nn.softplus(jax.random.normal(kk[4], (Bt, H)) - 3.0)
        return (jax.random.normal(kk[0], (Bt, R, H, N), bf16),
                jax.random.normal(kk[1], (Bt, R, H, N), bf16),
                jax.random.normal(kk[2], (Bt, H, P), bf16),
                jax.random.normal(kk[3], (Bt, H, P), bf16),
                jnp.pi * jnp.tanh(jax.random.normal(kk[5], (Bt, H, S))) * dt[..., None],
                -dt, 0.5 * dt, 0.5 * dt)

    prm = dict(D=jnp.ones((H,), f32))
    if R > 1:
        prm.update(mimo_x=jnp.full((H, R, P), 1.0 / R), mimo_z=jnp.ones((H, R, P)),
                   mimo_o=jnp.full((H, R, P), 1.0 / R))

    def fresh_state():
        return SSMState(angle=jnp.zeros((Bt, H, S), f32),
                        h=(jax.random.normal(ks[9], (Bt, H, P, N)) * 0.1).astype(sdt),
                        k_prev=jnp.zeros((Bt, R, H, N), bf16),
                        x_prev=jnp.zeros((Bt, H, P), bf16))

    return [tok(i) for i in range(sets)], prm, fresh_state


def _kernel_step(state, q, k, x, z, inc, ld, gm, eta, *, prm, interpret):
    return decode_step(state, q, k, x, z, inc, ld, gm, eta, None, interpret=interpret, **prm)


def _xla_step(state, q, k, x, z, inc, ld, gm, eta, *, prm):
    y, new = ssm_step(state, q, k, x, inc, ld, gm, eta, None, prm.get("mimo_x"))
    out = gate_output(y[:, None], x[:, None], z[:, None], prm["D"], prm.get("mimo_x"),
                      prm.get("mimo_z"), prm.get("mimo_o"))[:, 0]
    return out, new


def run_decode(rows, ceil, args):
    bw, mm = ceil
    Bt, H, P = (4, 2, 16) if args.smoke else (128, 64, 64)
    for N, R, sdt in ((128, 1, f32), (64, 1, f32), (128, 1, bf16), (128, 4, f32)):
        if args.smoke:
            N = 32
        S = N // 4
        name = f"decode B={Bt} H={H} N={N} R={R} state={jnp.dtype(sdt).name}"
        sb = jnp.dtype(sdt).itemsize
        nbytes = 2 * Bt * H * P * N * sb + Bt * H * (4 * P * 2 + 4 * R * N * 2 + 8 * S + 12)
        flops = Bt * H * (6 * R * P * N + 2 * P * N)
        floor = max(nbytes / bw, flops / mm) * 1e3
        official = OFFICIAL.get(("decode", Bt, N)) if (R == 1 and sdt == f32) else None
        toks, prm, fresh_state = _decode_problem(Bt, H, P, N, R, sdt, args.sets)
        kernel_step = functools.partial(_kernel_step, prm=prm, interpret=args.smoke)
        xla_step = functools.partial(_xla_step, prm=prm)

        for impl, fn in (("pallas decode kernel", kernel_step), ("xla ssm_step + gate", xla_step)):
            f = jax.jit(fn, donate_argnums=0)
            try:
                state = fresh_state()
                for i in range(2):  # warm-up
                    _, state = f(state, *toks[i % len(toks)])
                jax.block_until_ready(state)
                samples = []
                for r in range(args.reps):
                    t0 = time.perf_counter()
                    for i in range(args.inner):
                        out, state = f(state, *toks[(r + i) % len(toks)])
                    jax.block_until_ready(state)
                    samples.append((time.perf_counter() - t0) / args.inner * 1e3)
                ms, note = statistics.median(samples), "state updated in place (donated)"
            except Exception as e:
                ms, note = None, f"FAILED: {type(e).__name__}: {str(e)[:120]}"
            rows.append(Row(name, impl, ms, floor, official, note))
            print(json.dumps(dataclasses.asdict(rows[-1])), flush=True)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", default="fwd,fwd+bwd,decode,sweep")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--sets", type=int, default=2, help="input copies rotated between calls")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
    ap.add_argument("--write-docs", action="store_true",
                    help="replace the 'Pallas kernels' section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.smoke:
        args.reps, args.inner, args.sets = 2, 1, 1
    what = set(args.what.split(","))
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"commit {commit()}", flush=True)
    if not args.smoke and jax.default_backend() not in ("gpu", "cuda"):
        sys.exit("the benchmark needs a GPU (use --smoke on the CPU)")
    ceil = measure_ceilings(args.reps, args.smoke)
    print(f"copy bandwidth {ceil[0] / 1e12:.2f} TB/s (read + write), "
          f"bf16 matmul {ceil[1] / 1e12:.0f} TFLOP/s", flush=True)
    shapes = ([(1, 64, 2, 1), (1, 64, 2, 4)] if args.smoke else
              [(8, 2048, 32, 1), (8, 2048, 64, 1), (1, 16384, 64, 1), (8, 2048, 32, 4)])
    rows: list[Row] = []
    if "fwd" in what:
        run_forward(rows, shapes, ceil, args, grad=False)
    if "fwd+bwd" in what:
        run_forward(rows, shapes, ceil, args, grad=True)
    if "decode" in what:
        run_decode(rows, ceil, args)
    if "sweep" in what:
        run_sweep(rows, ceil, args)
    header = (f"Device: {dev.device_kind}; jax {jax.__version__}; commit {commit()}; "
              f"command: `PYTHONPATH=. python -m pallas_kernels.bench "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`.  \n"
              f"Ceilings measured in the same run: copy {ceil[0] / 1e12:.2f} TB/s (read + "
              f"write), bf16 matmul {ceil[1] / 1e12:.0f} TFLOP/s. SISO/MIMO bf16, P=64, "
              f"N=128, G=1, chunk 64/R, with D and gate; median over {args.reps} x "
              f"{args.inner} calls.")
    publish(header, table(rows), out_name="bench_kernels.md", section="## Pallas kernels",
            write_docs=args.write_docs)


if __name__ == "__main__":
    main()
