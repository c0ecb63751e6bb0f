"""Compile the GPU kernels without a GPU: lower to Triton IR on the CPU, then (optionally) build
sm_90a code with a local Triton and report registers, spills and shared memory.

    PYTHONPATH=. python -m pallas_kernels.compile_check            # lowering only (CI-safe)
    pip install --target /tmp/tritonpkg triton==3.6.0              # once, ~650 MB
    PYTHONPATH=.:/tmp/tritonpkg python -m pallas_kernels.compile_check --triton

Lowering runs Pallas' Triton lowering rules (what the GPU will be handed). `--triton` then runs
Triton's own passes (layouts, software pipelining, wgmma selection) and ptxas, which catch what
the lowering cannot: unsupported layouts, shared-memory overflow, register spills. Model shapes:
B=2, L=256, H=4, N=128, P=64, S=32, chunk 64/R, resets on.

Both backward implementations are lowered (`--bwd fused|split|both`); `--chunk`, `--blocks
num_warps_bwd_chunk=4,block_p=32` (BlockSizes fields), `--cases R1_bfloat16,R4_bfloat16`,
`--norm` (with the RMSNorm) and `--no-decode` select what to compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering as _tl
from jax._src.pallas.triton import pallas_call_registration as _reg

from mamba3_jax.ops.ssm import SSMInputs, SSMState
from pallas_kernels.chunked import BlockSizes, chunked_core
from pallas_kernels.decode import decode_step

_MODULES: list[tuple[str, str]] = []


def _capture():
    orig = _tl.lower_jaxpr_to_triton_module

    def patched(*a, **k):
        res = orig(*a, **k)
        op = res.module.operation
        name = re.search(r"@(\w+)", op.get_asm(enable_debug_info=False)[:200]).group(1)
        _MODULES.append((name, op.get_asm(enable_debug_info=False)))
        return res

    _reg.lowering.lower_jaxpr_to_triton_module = patched


def _problem(R, dtype, B=2, L=256, H=4, N=128, P=64):
    S = N // 4
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    inp = SSMInputs(q=jax.random.normal(ks[0], (B, L, R, 1, N), dtype),
                    k=jax.random.normal(ks[1], (B, L, R, 1, N), dtype),
                    x=jax.random.normal(ks[2], (B, L, H, P), dtype),
                    angle_inc=jnp.zeros((B, L, H, S)), log_decay=-jnp.ones((B, L, H)),
                    gamma=jnp.ones((B, L, H)), eta=jnp.ones((B, L, H)),
                    reset=jnp.zeros((B, L), bool))
    if "q_bias" in SSMInputs._fields:
        inp = inp._replace(q_bias=jnp.ones((H, R, N)), k_bias=jnp.ones((H, R, N)))
    state = SSMState.zeros(B, H, P, N, S, R, dtype=dtype)
    p = dict(z=jax.random.normal(ks[3], (B, L, H, P), dtype), D=jnp.ones((H,)))
    if R > 1:
        p.update(mimo_x=jnp.ones((H, R, P)), mimo_z=jnp.ones((H, R, P)),
                 mimo_o=jnp.ones((H, R, P)))
    return inp, state, p


CASES = ((1, jnp.bfloat16), (4, jnp.bfloat16), (1, jnp.float32))


def lower_all(blocks: BlockSizes, bwd_modes=("fused", "split"), chunk=64, cases=None,
              norm=False, decode=True):
    """Lower forward, forward+backward (each backward mode) and decode kernels;
    returns [(tag, name, ttir)], each distinct module once."""
    _capture()
    out = []
    for R, dtype in CASES:
        tag = f"R{R}_{jnp.dtype(dtype).name}"
        if cases and tag not in cases:
            continue
        inp, state, p = _problem(R, dtype)
        if norm:
            p["norm_weight"] = jnp.ones((inp.x.shape[2], inp.x.shape[3]))

        for mode in bwd_modes:
            def loss(inp, state, p, R=R, mode=mode):
                o, fin = chunked_core(inp, state, chunk_size=chunk // R,
                                      blocks=dataclasses.replace(blocks, bwd=mode), **p)
                return jnp.sum(o) + jnp.sum(fin.h)

            _MODULES.clear()
            jax.jit(jax.grad(loss, argnums=(0, 1, 2), allow_int=True)).trace(
                inp, state, p).lower(lowering_platforms=("cuda",))
            out += [(tag, n, m) for n, m in _MODULES if (tag, n, m) not in out]
        if not decode:
            continue
        inp1 = inp._replace(q=jnp.repeat(inp.q[:, 0], 4, axis=2),
                            k=jnp.repeat(inp.k[:, 0], 4, axis=2))
        _MODULES.clear()
        jax.jit(lambda st, q, k, x, z, inc, p: decode_step(
            st, q, k, x, z, inc, inc[..., 0], inc[..., 0], inc[..., 0], None, D=p["D"],
            mimo_x=p.get("mimo_x"), mimo_z=p.get("mimo_z"), mimo_o=p.get("mimo_o"))).trace(
            state, inp1.q, inp1.k, inp.x[:, 0], p["z"][:, 0], inp.angle_inc[:, 0], p
        ).lower(lowering_platforms=("cuda",))
        out += [(tag, n, m) for n, m in _MODULES]
    return out


def parse_blocks(spec: str) -> BlockSizes:
    """'num_warps_bwd_chunk=4,block_p=32' -> BlockSizes (ints where the field is an int)."""
    kw = {}
    for item in filter(None, spec.split(",")):
        key, val = item.split("=")
        kw[key] = val if key in ("bwd", "f32_mode") else int(val)
    return BlockSizes(**kw)


def triton_compile(ttir: str, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        ptx = k.asm["ptx"]
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "ptxas")
        info = ""
        if os.path.exists(ptxas):
            with open(os.path.join(d, "k.ptx"), "w") as f:
                f.write(ptx)
            r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", os.path.join(d, "k.ptx"),
                                "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", r.stderr)
            spill = re.search(r"(\d+) bytes spill stores", r.stderr)
            info = (f"regs {regs.group(1) if regs else '?'}, "
                    f"spill stores {spill.group(1) if spill else '?'} B")
        return (f"shared {k.metadata.shared} B, wgmma {ptx.count('wgmma.mma_async')}, "
                f"mma.sync {ptx.count('mma.sync')}, {info}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--triton", action="store_true", help="also compile with a local Triton")
    ap.add_argument("--bwd", default="both", choices=("fused", "split", "both"))
    ap.add_argument("--chunk", type=int, default=64, help="tokens per chunk at R = 1 (/R)")
    ap.add_argument("--blocks", default="", help="BlockSizes fields, e.g. num_warps_bwd=4")
    ap.add_argument("--cases", default="", help="e.g. R1_bfloat16,R4_bfloat16 (default all)")
    ap.add_argument("--norm", action="store_true", help="with the per-head RMSNorm")
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args(argv)
    blocks = parse_blocks(args.blocks)
    modes = ("fused", "split") if args.bwd == "both" else (args.bwd,)
    mods = lower_all(blocks, modes, args.chunk, set(filter(None, args.cases.split(","))),
                     args.norm, not args.no_decode)
    warps = {"mamba3_chunked_fwd": (blocks.num_warps_fwd, blocks.num_stages_fwd),
             "mamba3_chunked_bwd": (blocks.num_warps_bwd, blocks.num_stages_bwd),
             "mamba3_chunked_bwd_state": (blocks.num_warps_bwd_state,
                                          blocks.num_stages_bwd_state),
             "mamba3_chunked_bwd_chunk": (blocks.num_warps_bwd_chunk,
                                          blocks.num_stages_bwd_chunk),
             "mamba3_decode": (4, 1)}
    for tag, name, ttir in mods:
        line = f"{tag:16s} {name:26s} lowered ({len(ttir)} chars of TTIR)"
        if args.triton:
            nw, ns = warps.get(name, (4, 1))
            try:
                line += f"; sm_90a nw={nw} ns={ns}: " + triton_compile(ttir, nw, ns)
            except Exception as e:  # report and go on
                line += f"; Triton FAILED: {type(e).__name__}: {str(e)[:300]}"
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
