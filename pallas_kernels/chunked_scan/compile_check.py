"""Registers and spills of every chunked-scan GPU kernel, on any host (no GPU needed).

The benchmark's layer (forward, or forward + backward) is lowered for CUDA; each Pallas Triton
kernel's Triton IR is captured from jax's lowering and compiled by the `triton` package for
sm_90a, and ptxas reports registers and spill bytes. Iterate on spills here; time on the GPU.

    PYTHONPATH=. python -m pallas_kernels.chunked_scan.compile_check            # shape a, fwd+bwd
    PYTHONPATH=. python -m pallas_kernels.chunked_scan.compile_check --variants "ours,split_grad=2"
    PYTHONPATH=. python -m pallas_kernels.chunked_scan.compile_check --modes fwd --sass

Needs `triton` importable (the GPU machine has it; on a CPU host put a wheel's package on
PYTHONPATH or pass --triton_path). The jax on this host lowers, the `triton` here compiles: a
GPU's own jax/Triton pair may allocate a few registers differently, so treat counts near 255 as
"at the limit", and confirm on the GPU (`ncu`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import subprocess
import sys
import tempfile

import jax

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default (and XLA's)

from pallas_kernels.chunked_scan import bench
from pallas_kernels.chunked_scan.api import chunked_scan
from pallas_kernels.chunked_scan.pallas_triton import TritonBlocks
from pallas_kernels.chunked_scan.shapes import PREFILL_SHAPES

REGISTER_LIMIT = 255


def capture_kernels(fn, *args):
    """(name, num_warps, num_stages, Triton IR text) of every Pallas Triton kernel in fn(*args)
    lowered for CUDA (the launch parameters as the lowered custom calls carry them)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured = []
    original = registration.lowering.lower_jaxpr_to_triton_module

    def spy(jaxpr, *rest, **kw):
        result = original(jaxpr, *rest, **kw)
        captured.append((jaxpr.debug_info.func_name,
                         result.module.operation.get_asm(enable_debug_info=False)))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = spy
    try:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
    launch = {m.group(1): (int(m.group(3)), int(m.group(2))) for m in re.finditer(
        r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)}
    return [(name, *launch[name], ttir) for name, ttir in captured]


def compile_stats(ttir: str, num_warps: int, num_stages: int, sass: bool = False) -> dict:
    """Compile Triton IR for sm_90a: registers, spill stores/loads (bytes), shared memory; with
    `sass`, also the instructions per thread on the main path (`main_path`: up to the first
    EXIT, where the cold blocks, e.g. sin / cos for huge arguments, begin) and its opcode counts
    (`ops`), from `nvdisasm`. A kernel that issues more instructions than its bytes need shows
    here before any GPU time (docs/kernels.md, "Decode step")."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        extra = {}
        if sass:
            cubin = os.path.join(tmp, "kernel.cubin")
            with open(cubin, "wb") as f:
                f.write(k.asm["cubin"])
            text = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", cubin],
                                  capture_output=True, text=True, check=True).stdout
            extra = main_path_ops(text)
        # the newest bundled ptxas: the PTX ISA version Triton emits can be newer than the
        # plain `ptxas` it ships
        ptxas = next(p for p in (os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas"))
                     if os.path.exists(p))
        arch = re.search(r"\.target\s+(sm_\w+)", k.asm["ptx"]).group(1)
        res = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx, "-o", os.devnull],
                             capture_output=True, text=True)
    info = res.stderr
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {info.strip()[-300:]}")

    def num(pattern):
        m = re.search(pattern, info)
        return int(m.group(1)) if m else 0

    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), smem=k.metadata.shared, **extra)


def main_path_ops(sass: str) -> dict:
    """nvdisasm text -> {'main_path': instructions before the first EXIT, 'ops': Counter of
    their opcodes (predicates and modifiers dropped: FFMA.FTZ counts as FFMA), 'loads_before_bar':
    global loads (LDG) issued before the main path's first barrier (BAR), or all of them when it
    has none}."""
    ops = collections.Counter()
    loads_before_bar = None
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if not m:
            continue
        if m.group(1) == "EXIT":
            break
        if m.group(1) == "BAR" and loads_before_bar is None:
            loads_before_bar = ops["LDG"]
        ops[m.group(1)] += 1
    return dict(main_path=sum(ops.values()), ops=ops,
                loads_before_bar=ops["LDG"] if loads_before_bar is None else loads_before_bar)


def check(blocks: TritonBlocks, shape: str = "a", mode: str = "fwd+bwd", R: int = 1,
          chunk: int = 0, sass: bool = False, **opts):
    """Rows (kernel, warps, stages, regs, spill bytes, smem; with `sass` the main-path
    instructions per thread and their opcodes) for one variant; chunk in tokens (0: the
    benchmark's 64 / R)."""
    B, L, H = PREFILL_SHAPES[shape]
    d = jax.eval_shape(lambda: bench.official_like_inputs(0, B, L, H, R=R))
    core = functools.partial(chunked_scan, blocks=blocks, chunk_size=chunk or 64 // R, **opts)
    f = bench.layer_fn(core)
    if mode == "fwd":
        fn, args = f, (d,)
    else:
        dout = jax.ShapeDtypeStruct((B, L, H, 64), bench.bf16)
        fn, args = bench.fwd_bwd(f), (d, dout)
    rows, seen = [], set()
    for name, warps, stages, ttir in capture_kernels(fn, *args):
        if (name, ttir) in seen:
            continue
        seen.add((name, ttir))
        rows.append(dict(kernel=name, warps=warps, stages=stages,
                         **compile_stats(ttir, warps, stages, sass=sass)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="ours", help="comma list of 'ours' or "
                    "'field=value;field=value' (TritonBlocks)")
    ap.add_argument("--shape", default="a")
    ap.add_argument("--modes", default="fwd+bwd", help="fwd and/or fwd+bwd")
    ap.add_argument("--mimo", action="store_true", help="R=4 (chunk 16)")
    ap.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: 64 / R)")
    ap.add_argument("--triton_path", default=None, help="a folder holding the triton package")
    ap.add_argument("--sass", action="store_true",
                    help="also the main-path SASS instructions per thread (up to the first EXIT; "
                         "loops and inlined cold paths make it a static count) and top opcodes")
    args = ap.parse_args(argv)
    if args.triton_path:
        sys.path.insert(0, args.triton_path)
    print(f"{'variant':28} {'mode':8} {'kernel':26} {'w':>2} {'st':>2} {'regs':>4} "
          f"{'spill st':>8} {'spill ld':>8} {'smem':>6}" + ("  main path, top ops" if args.sass
                                                           else ""))
    for spec in args.variants.split(","):
        for mode in args.modes.split(","):
            blocks, opts = bench.parse_variant(spec)
            for r in check(blocks, args.shape, mode, 4 if args.mimo else 1, args.chunk,
                           sass=args.sass, **opts):
                flag = "  <- spills" if r["spill_stores"] else ""
                ops = (f"  {r['main_path']}: " + ", ".join(
                    f"{k} {v}" for k, v in r["ops"].most_common(6))) if args.sass else ""
                print(f"{spec[:28]:28} {mode:8} {r['kernel'][:26]:26} {r['warps']:>2} "
                      f"{r['stages']:>2} {r['regs']:>4} {r['spill_stores']:>8} "
                      f"{r['spill_loads']:>8} {r['smem']:>6}{ops}{flag}", flush=True)


if __name__ == "__main__":
    main()
