"""Registers, spills and main-path instructions of the decode-step kernel, on any host.

The kernel at the benchmark's shape (`shapes.STEP_SHAPE`, one B/C group with per-head biases,
S = N / 4, a reset) is lowered for CUDA, its Triton IR compiled for sm_90a by the `triton`
package, ptxas reports registers and spills and nvdisasm gives the instructions per thread up to
the first EXIT (`chunked_scan.compile_check.compile_stats`). The step moves little besides the
state, so a launch shape whose programs issue many instructions per state element is slow
before its bytes are (docs/kernels.md, "Decode step"):

    PYTHONPATH=. python -m pallas_kernels.decode_step.compile_check --variants "32:4,32:4:xlatrig"
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from mamba3_jax.ops.ssm import SSMState
from pallas_kernels.chunked_scan.compile_check import capture_kernels, compile_stats
from pallas_kernels.decode_step.pallas_triton import DecodeBlocks, decode_step, parse_blocks
from pallas_kernels.decode_step.shapes import STEP_SHAPE

f32 = jnp.float32


def step_shapes(R: int, N: int, state_dtype, dtype=None, B: int = 8, H: int = 4,
                P: int = STEP_SHAPE["P"]):
    """Abstract (state, inputs, params) of one step: activations in the state's dtype, as the
    benchmark runs them. B and H only set the grid, not the kernel's code."""
    dtype = jnp.dtype(dtype or state_dtype)
    S = N // 4
    a = jax.ShapeDtypeStruct
    state = SSMState(angle=a((B, H, S), f32), h=a((B, H, P, N), jnp.dtype(state_dtype)),
                     k_prev=a((B, R, H, N), dtype), x_prev=a((B, H, P), dtype))
    inp = dict(q=a((B, R, 1, N), dtype), k=a((B, R, 1, N), dtype), x=a((B, H, P), dtype),
               z=a((B, H, P), dtype), angle_inc=a((B, H, S), f32), log_decay=a((B, H), f32),
               gamma=a((B, H), f32), eta=a((B, H), f32), reset=a((B,), jnp.bool_))
    prm = dict(D=a((H,), f32), q_bias=a((H, R, N), f32), k_bias=a((H, R, N), f32))
    if R > 1:
        prm.update({name: a((H, R, P), f32) for name in ("mimo_x", "mimo_z", "mimo_o")})
    return state, inp, prm


def _step(state, inp, prm, blocks):
    return decode_step(state, inp["q"], inp["k"], inp["x"], inp["z"], inp["angle_inc"],
                       inp["log_decay"], inp["gamma"], inp["eta"], inp["reset"], D=prm["D"],
                       mimo_x=prm.get("mimo_x"), mimo_z=prm.get("mimo_z"),
                       mimo_o=prm.get("mimo_o"), q_bias=prm["q_bias"], k_bias=prm["k_bias"],
                       blocks=blocks, interpret=False)


def check(blocks: DecodeBlocks, R: int = 1, N: int = 128, state_dtype="bfloat16") -> dict:
    """{'regs', 'spill_stores', 'spill_loads', 'smem', 'main_path', 'ops', 'warps'} of the
    kernel at this launch shape."""
    [(_, warps, stages, ttir)] = capture_kernels(
        functools.partial(_step, blocks=blocks), *step_shapes(R, N, state_dtype))
    return dict(warps=warps, **compile_stats(ttir, warps, stages, sass=True))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="16:2,32:4,P:4,16:2:xlatrig,32:4:xlatrig,P:4:xlatrig",
                    help="launch shapes, bp:warps[:noevict][:xlatrig][:fasttrig]")
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--d_states", default="128,64")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="state (and activation) dtypes")
    ap.add_argument("--top", type=int, default=8, help="opcodes listed per row")
    args = ap.parse_args(argv)
    print("| R | N | state | launch | regs | spill bytes | main-path instructions per thread "
          "| per state element | top opcodes |\n|---|---|---|---|---|---|---|---|---|")
    for R in (int(r) for r in args.ranks.split(",")):
        for N in (int(n) for n in args.d_states.split(",")):
            for sd in args.dtypes.split(","):
                for spec in args.variants.split(","):
                    blocks = parse_blocks(spec)
                    r = check(blocks, R, N, sd)
                    rows = blocks.block_p or STEP_SHAPE["P"]
                    per_elem = r["main_path"] * r["warps"] * 32 / (rows * N)
                    top = ", ".join(f"{k} {v}" for k, v in r["ops"].most_common(args.top))
                    print(f"| {R} | {N} | {sd} | {blocks.label()} | {r['regs']} | "
                          f"{r['spill_stores']} | {r['main_path']} | {per_elem:.2f} | {top} |",
                          flush=True)


if __name__ == "__main__":
    main()
