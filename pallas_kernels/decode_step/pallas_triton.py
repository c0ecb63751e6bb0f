"""Single-token Mamba-3 decode step as one Pallas Triton kernel.

Per program (batch b, head h, block of `block_p` rows of P): angle update (mod 2 pi) and
rotation of q, k in registers, the exponential-trapezoidal rank-R update of those rows of the
state, readout, + D x, optional per-head RMSNorm, the gate silu(z * mimo_z) and the rank sum
with mimo_o. Semantics: `mamba3_jax.ops.ssm.ssm_step` then `mamba3_jax.ops.mixer.gate_output`.

A step is a stream over the state h (B, H, P, N): everything else is ~1% of the bytes. So:

  * nothing runs in XLA around the kernel: scalars, the reset flags, the epilogue parameters and
    group-level q, k with their per-head biases are read as they come (no stacking, casting or
    broadcasting pass, each of which would be a separate launch);
  * h is updated in place (`input_output_aliases`; donate the cache under jit, or XLA copies it
    first), loaded and stored whole rows (contiguous along N: 16-byte vector accesses), with an
    evict-first hint (each byte is touched once, it should not push q, k, params out of L2);
  * the grid runs in memory order (P blocks fastest, then heads, then batch) and `block_p`
    (rows per program) with `num_warps` set the work per program: `DecodeBlocks`, by default
    the measured best per (state dtype, N, R) (`MEASURED`, `default_blocks`).

The small state (angle, k_prev, x_prev) is written to fresh arrays, not in place: with several
P blocks per head, one program would overwrite k_prev or the angle while another still reads
them. The P block 0 program writes angle and k_prev (with `DecodeBlocks.xla_rot` XLA forms every
head's rotated q and k and its k is the new k_prev). With `DecodeBlocks.xla_trig` XLA forms the
new angle and its cos / sin (B, H, S) before the kernel instead (a small elementwise pass that
XLA can fuse with whatever forms the increments), and the kernel only reads them. The state h
may be float32 or bfloat16; the arithmetic is float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba3_jax.ops.rotary import TWO_PI
from mamba3_jax.ops.ssm import SSMInputs, SSMState, per_head, rotated_qk
from pallas_kernels._compat import (
    SQ,
    KernelUnsupported,
    compiler_params,
    dot,
    is_pow2,
    plgpu,
    sincos,
)

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """Launch shape of the decode kernel. block_p: rows of the state per program (None: all P;
    a per-head RMSNorm needs all P). evict_first: streaming hint on the state's loads/stores."""

    block_p: Optional[int] = None
    num_warps: int = 4
    evict_first: bool = True
    # the new angle and its cos / sin per (b, h, pair) from XLA (fused with what forms the
    # increments) instead of in every program: the kernel issues instructions, not bytes, at
    # bf16 (offline SASS: the accurate sin / cos of N channels, replicated per warp and P block,
    # are 25-39% of a SISO program's main path); no angle output (XLA's value is the state)
    xla_trig: bool = False
    # in-kernel cos / sin (without xla_trig) by the MUFU approximations (`_compat.sincos`):
    # the accurate sinf / cosf were the largest fixed cost of a program (offline SASS)
    fast_trig: bool = False
    # MIMO with a bfloat16 state: the rank-2R update of h and the R readouts as two tensor-core
    # dots with bf16 operands (the update's [beta x_prev mimo_x, gamma x mimo_x] against [k_prev;
    # k], zero-padded to 16, and the rounded new state against q), where the default issues
    # 2R FMAs and R reductions per state element on the CUDA cores (offline SASS: 52.6
    # instructions per element at R 4, against 19.7 for SISO). Session 15 timed it: the MIMO bf16
    # N=128 default (`MEASURED`); at N=64 it lost to the FMA kernel (102.4 against 90.0 us)
    mma: bool = False
    # The barrier that keeps the in-place update safe (no warp stores rows of h that another
    # warp of the program has still to load) placed just before the store of h instead of just
    # after its load. A barrier orders the memory accesses before it (PTX bar.sync acts as
    # membar.cta), so after the load it waits for the h tile to arrive before the program issues
    # its small loads (q, k, biases, angles, scalars): two DRAM round trips in a row. Before the
    # store the small loads fly with h's. Equally safe; opt-in until timed (session 15)
    late_barrier: bool = False
    # XLA forms the rotated, biased q and k of every head (B, R, H, N) before the kernel (from
    # the new angle, as `xla_trig`), and the kernel only loads them: no per-program rotation,
    # bias, partner gathers or k_prev store (XLA's k is the new state's k_prev). Offline the
    # rotation and its loads were most of the kernel's per-element instructions beyond the
    # update and readout (`experiments/bench_stream.py`); costs two (B, R, H, N) tensors
    # written and read (~3% of the state's bytes at N = 128). Opt-in until timed (session 15)
    xla_rot: bool = False

    def label(self) -> str:
        return (f"bp={self.block_p or 'P'} w={self.num_warps}"
                + ("" if self.evict_first else " no-evict")
                + (" xla-trig" if self.xla_trig else "")
                + (" fast-trig" if self.fast_trig else "") + (" mma" if self.mma else "")
                + (" late-barrier" if self.late_barrier else "")
                + (" xla-rot" if self.xla_rot else ""))


# The measured best launch shape per (state dtype, N, R), and the XLA step's time beside it.
# One NVIDIA H200, jax 0.11.2, B=128 H=64 P=64 (one B/C group, per-head biases):
#   PYTHONPATH=. python experiments/bench_decode_step.py --official .official
# Every row of those runs is in docs/benchmarks.md ("Decode step alone"). MIMO was timed at R=4.
# Rows without xla_trig: commit 97a0de3, the XLA step's us from session 9 (`ssm_step` with
# broadcast-product rank sums). Rows with xla_trig: session 11 (commit e9086af), where it beat
# every launch shape without it in the same call by >= 3% (N=64, and MIMO bf16 N=128); where it
# did not (SISO N=128, MIMO fp32 N=128) the older row stands (this call within 1-2% of it).
# Session 12 (commit 5507f68) added launch shapes of fewer registers: MIMO fp32 N=128 at bp=16
# on 4 warps with xla_trig (48-56 registers offline) ran 278.1 us against 289.1-297.6 for every
# shape without it in the same call; the other rows held within 3%.
# Session 15 (commit 9b8dcd9) timed the tensor-core update (`mma`, MIMO bf16 only): at N=128
# bp=64 on 4 warps with xla_trig ran 147.1 us against 181.2 for the best shape without it (and the
# layer step 0.197 against 0.229 ms); at N=64 the FMA row stands (90.0 us, mma's best 102.4).
# Session 17 (commit 2c699ad, `experiments/gpu_pending.sh decode`) timed the XLA step with a
# barrier between the chained steps (before, XLA could fold one step's update into the next:
# its old figures were 35-55% too fast) and the session 15 options: the third column is that
# call's XLA step, which now loses to the kernel in every row (SISO float32 N=128: 179.7 against
# 169.8 us, the official step 169.8). `xla_rot` won MIMO bf16 N=64 (87.0 against 94.7 us for
# the old row's shape, same call); `late_barrier` moved shapes by -4.5% to +13.5% and no case's
# best with it beat the best without it by more than 2.5% (not taken).
# key -> (fastest DecodeBlocks, its us, the XLA step's us)
MEASURED = {
    ("float32", 128, 1): (DecodeBlocks(16, 4), 171.7, 179.7),
    ("float32", 128, 4): (DecodeBlocks(16, 4, xla_trig=True), 278.1, 452.6),
    ("bfloat16", 128, 1): (DecodeBlocks(16, 2), 96.4, 120.8),
    ("bfloat16", 128, 4): (DecodeBlocks(64, 4, xla_trig=True, mma=True), 147.1, 470.1),
    ("float32", 64, 1): (DecodeBlocks(16, 2), 92.1, 116.1),
    ("float32", 64, 4): (DecodeBlocks(16, 2, xla_trig=True), 138.9, 242.8),
    ("bfloat16", 64, 1): (DecodeBlocks(32, 2, xla_trig=True), 54.2, 70.9),
    ("bfloat16", 64, 4): (DecodeBlocks(32, 2, xla_rot=True), 87.0, 247.2),
}
# unmeasured (dtype, N): bp=16 w=2 was within 6% of the best in every measured case (the old
# default, whole P on 4 warps, was up to 1.6x slower)
FALLBACK_BLOCKS = DecodeBlocks(16, 2)


def _measured(state_dtype, N: int, R: int):  # any MIMO rank: the R=4 row
    return MEASURED.get((jnp.dtype(state_dtype).name, N, 1 if R == 1 else 4))


def parse_blocks(spec: str) -> DecodeBlocks:
    """'bp:warps[:noevict][:xlatrig][:fasttrig][:mma][:late][:xlarot]' (bp 'P' for all rows)
    -> DecodeBlocks, e.g. '16:2'; 'late' is `late_barrier`, 'xlarot' `xla_rot`."""
    bp, _, rest = spec.partition(":")
    warps, *flags = rest.split(":") if rest else [""]
    bad = [f for f in flags
           if f not in ("noevict", "xlatrig", "fasttrig", "mma", "late", "xlarot")]
    if not (bp == "P" or bp.isdigit()) or not warps.isdigit() or bad:
        raise ValueError(f"bad decode launch shape {spec!r}: want bp:warps[:noevict][:xlatrig]"
                         "[:fasttrig][:mma][:late][:xlarot] with bp a number or P")
    return DecodeBlocks(block_p=None if bp == "P" else int(bp), num_warps=int(warps),
                        evict_first="noevict" not in flags, xla_trig="xlatrig" in flags,
                        fast_trig="fasttrig" in flags, mma="mma" in flags,
                        late_barrier="late" in flags, xla_rot="xlarot" in flags)


def mma_applies(state_dtype, R: int) -> bool:
    """Whether `DecodeBlocks.mma` covers the case: MIMO with a bfloat16 state."""
    return R > 1 and jnp.dtype(state_dtype) == jnp.bfloat16


def default_blocks(state_dtype, N: int, R: int, P: int, has_norm: bool = False) -> DecodeBlocks:
    """The launch shape `decode_step` uses when none is given: $MAMBA3_DECODE_BLOCKS when set
    (`parse_blocks`: how a benchmark of the whole layer tries a shape), else the measured best
    (`MEASURED`)."""
    if has_norm:  # the per-head RMSNorm needs all P rows in one program
        return DecodeBlocks()
    if os.environ.get("MAMBA3_DECODE_BLOCKS"):
        blocks = parse_blocks(os.environ["MAMBA3_DECODE_BLOCKS"])
        if blocks.mma and not mma_applies(state_dtype, R):
            blocks = dataclasses.replace(blocks, mma=False)  # a whole-model override: MIMO bf16
    else:
        hit = _measured(state_dtype, N, R)
        blocks = hit[0] if hit else FALLBACK_BLOCKS
    if blocks.block_p and blocks.block_p > P:
        blocks = dataclasses.replace(blocks, block_p=None)
    return blocks


def xla_step_faster(state_dtype, N: int, R: int) -> bool:
    """Whether the XLA step beat every kernel launch shape in `MEASURED` (the 'auto' step
    backend then runs it). Since session 17's barrier timing, nowhere; unmeasured N: the
    kernel, as in every measured row."""
    hit = _measured(state_dtype, N, R)
    return bool(hit) and hit[2] < hit[1]


def _load(ref, evict_first: bool):
    if evict_first and plgpu is not None and hasattr(plgpu, "load"):
        return plgpu.load(ref, eviction_policy="evict_first")
    return ref[...]


def _store(ref, value, evict_first: bool):
    if evict_first and plgpu is not None and hasattr(plgpu, "store"):
        plgpu.store(ref, value, eviction_policy="evict_first")
    else:
        ref[...] = value


def _get(ref, name):
    """A whole block of the kernel's refs (a dict by name), float32."""
    return ref[name][...].astype(f32)


def _rows(ref, name, R):
    """Per-rank rows of a (R, M) block, float32 (Triton cannot index values); None if absent."""
    return [ref[name][r, :].astype(f32) for r in range(R)] if name in ref else None


def _decode_kernel(*refs, in_names, out_names, R, N, S, has_norm, eps, interpret, evict_first,
                   fast_trig=False, mma=False, late_barrier=False):
    ref = dict(zip(in_names + out_names, refs, strict=True))
    get = functools.partial(_get, ref)
    barrier = not interpret and plgpu is not None  # h's buffer is the output's (in place)

    # the state rows first
    h = _load(ref["h"], evict_first).astype(f32)  # (bp, N)
    if barrier and not late_barrier:
        plgpu.debug_barrier()

    keep = 1.0 - ref["reset"][...].astype(jnp.int32).astype(f32) if "reset" in ref else 1.0
    alpha = jnp.exp(get("log_decay"))
    decay = alpha * keep  # of the old state; 0 where a segment starts
    beta = get("eta") * alpha * keep  # of the previous token's outer product
    gamma = get("gamma")
    first_block = pl.program_id(0) == 0

    if "q_rot" in ref:  # rotated and biased by XLA (`DecodeBlocks.xla_rot`)
        q, k = _rows(ref, "q_rot", R), _rows(ref, "k_rot", R)
    else:
        q, k = _rotated_qk(ref, R, N, S, keep, first_block, fast_trig, interpret)
    _decode_update(ref, h, q, k, decay, beta, gamma, R, N, has_norm, eps, evict_first, mma,
                   barrier and late_barrier)


def _rotated_qk(ref, R, N, S, keep, first_block, fast_trig, interpret):
    """The rotated, biased q (float32) and k (at the input's precision, stored as the next
    k_prev by the P block 0 program) of this head, per rank."""
    get = functools.partial(_get, ref)
    n = jax.lax.broadcasted_iota(jnp.int32, (N,), 0)
    if S:
        # per channel n the angle of its pair n // 2 (identity beyond the 2S rotated channels)
        pair = jnp.minimum(n // 2, S - 1)
        rotated_channel = n < 2 * S
        sign = jnp.where(n % 2 == 0, -1.0, 1.0)  # (a, b) -> (a c - b s, b c + a s)
        if "cos" in ref:  # formed by XLA (`DecodeBlocks.xla_trig`)
            cos = jnp.where(rotated_channel, ref["cos"][pair], 1.0)
            sin = jnp.where(rotated_channel, ref["sin"][pair], 0.0) * sign
        else:
            theta = jnp.mod(ref["angle"][pair].astype(f32) * keep
                            + ref["angle_inc"][pair].astype(f32), TWO_PI)
            theta = jnp.where(rotated_channel, theta, 0.0)
            cos, sin = sincos(theta, fast_trig, interpret)
            sin = sin * sign

            @pl.when(first_block)
            def _():
                ref["angle_out"][...] = jnp.mod(get("angle") * keep + get("angle_inc"), TWO_PI)

    # each channel's pair partner is loaded (gather from L1) rather than shuffled in registers:
    # a register shuffle (reshape/split/join) costs layout conversions through shared memory
    partner = n + 1 - 2 * (n % 2)

    def rotated(name):  # (N,) per rank: + the per-head bias (rounded to the input's dtype)
        def biased(r, idx):
            v = ref[name][r, idx]
            if name + "_bias" in ref:
                v = (v.astype(f32) + ref[name + "_bias"][r, idx].astype(f32)).astype(v.dtype)
            return v.astype(f32)

        if not S:
            return [biased(r, n) for r in range(R)]
        return [biased(r, n) * cos + biased(r, partner) * sin for r in range(R)]

    q = rotated("q")
    k = [v.astype(ref["k_prev_out"].dtype) for v in rotated("k")]  # kept at input precision

    @pl.when(first_block)
    def _():
        for r in range(R):
            ref["k_prev_out"][r, :] = k[r]

    return q, [v.astype(f32) for v in k]


def _decode_update(ref, h, q, k, decay, beta, gamma, R, N, has_norm, eps, evict_first, mma,
                   late_barrier):
    """The state update, its store and the readouts' epilogue, from the rotated q, k."""
    get = functools.partial(_get, ref)
    rows = functools.partial(_rows, ref, R=R)
    k_prev = rows("k_prev")
    x_in = ref["x"][...]  # (bp,), stored as the next step's x_prev as it came
    x = x_in.astype(f32)
    x_prev = get("x_prev")
    ref["x_prev_out"][...] = x_in.astype(ref["x_prev_out"].dtype)
    mimo_x = rows("mimo_x") or [1.0] * R

    # h' = decay h + beta sum_r x_prev^(r) k_prev_r^T + gamma sum_r x^(r) k_r^T
    if mma:  # one (bp, 16) @ (16, N) bf16 dot: columns / rows r < 2R hold the rank-1 terms
        bf16 = jnp.bfloat16
        cols = jax.lax.broadcasted_iota(jnp.int32, (x.shape[0], 16), 1)
        rows16 = jax.lax.broadcasted_iota(jnp.int32, (16, N), 0)
        lhs = jnp.zeros((x.shape[0], 16), f32)
        rhs = jnp.zeros((16, N), f32)
        for r in range(R):
            for i, (w, u, kv) in enumerate(((beta, x_prev, k_prev[r]), (gamma, x, k[r]))):
                lhs = jnp.where(cols == r + i * R, (w * u * mimo_x[r])[:, None], lhs)
                rhs = jnp.where(rows16 == r + i * R, kv[None, :], rhs)
        h = h * decay + dot(lhs.astype(bf16), rhs.astype(bf16))
    else:
        h = h * decay
        for r in range(R):
            h = h + (beta * x_prev * mimo_x[r])[:, None] * k_prev[r][None, :]
            h = h + (gamma * x * mimo_x[r])[:, None] * k[r][None, :]
    h_new = h.astype(ref["h_out"].dtype)
    if late_barrier:
        plgpu.debug_barrier()
    _store(ref["h_out"], h_new, evict_first)
    if mma:  # the readouts h' q_r from the stored (rounded) state: (bp, N) @ (N, 16)
        qcols = jax.lax.broadcasted_iota(jnp.int32, (N, 16), 1)
        qmat = jnp.zeros((N, 16), f32)
        for r in range(R):
            qmat = jnp.where(qcols == r, q[r][:, None], qmat)
        reads = dot(h_new, qmat.astype(h_new.dtype))  # (bp, 16)
        ocols = jax.lax.broadcasted_iota(jnp.int32, reads.shape, 1)

        def readout(r):
            return jnp.sum(jnp.where(ocols == r, reads, 0.0), axis=1)
    else:
        def readout(r):  # only the ranks the epilogue reads
            return jnp.sum(h * q[r][None, :], axis=1)

    # y^(r) = h' q_r + D x^(r) -> [RMSNorm] -> * silu(z mimo_z[r]) -> sum_r mimo_o[r] (.)
    D = get("D")
    z = get("z")
    mimo_z = rows("mimo_z") or [1.0] * R
    mimo_o = rows("mimo_o")
    out = jnp.zeros_like(x)
    for r in range(R if mimo_o else 1):  # without mimo_o only rank 0 is read out (gate_output)
        u = readout(r) + D * x * mimo_x[r]
        if has_norm:
            u = u * jax.lax.rsqrt(jnp.mean(u * u) + eps) * get("norm_weight")
        zr = z * mimo_z[r]
        u = u * zr / (1.0 + jnp.exp(-zr))
        out = out + (u * mimo_o[r] if mimo_o else u)
    ref["out"][...] = out


def decode_step(state: SSMState, q, k, x, z, angle_inc, log_decay, gamma, eta, reset=None, *,
                D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None, norm_eps=1e-5,
                q_bias=None, k_bias=None, blocks: Optional[DecodeBlocks] = None,
                interpret: bool = False):
    """One token. q, k (B, R, Hq, N) unrotated: per head (Hq = H, biased) or per B/C group
    (Hq = G dividing H) with per-head biases q_bias, k_bias (H, R, N); x, z (B, H, P);
    angle_inc (B, H, S); log_decay, gamma, eta (B, H); reset (B,) bool or None.
    blocks: the launch shape, None for the measured best (`default_blocks`).
    Returns (out (B, H, P) float32, new state); h is updated in place."""
    B, R, Hq, N = q.shape
    H, P = x.shape[1:]
    S = angle_inc.shape[-1]
    if blocks is None:
        blocks = default_blocks(state.h.dtype, N, R, P, norm_weight is not None)
    bp = blocks.block_p or P
    if not (is_pow2(N) and N >= 16 and is_pow2(P) and P >= 16 and is_pow2(R)):
        raise KernelUnsupported(
            f"decode needs power-of-two N ({N}) >= 16, P ({P}) >= 16 and R ({R})")
    if not (is_pow2(bp) and bp <= P):
        raise KernelUnsupported(f"block_p {bp} must be a power of two <= P ({P})")
    if norm_weight is not None and bp != P:
        raise KernelUnsupported("the per-head RMSNorm needs block_p == P")
    if H % Hq:
        raise KernelUnsupported(f"{Hq} B/C groups do not divide {H} heads")
    if R > 1 and mimo_x is None:
        raise KernelUnsupported("MIMO (R > 1) needs mimo_x")
    if blocks.mma and not (mma_applies(state.h.dtype, R) and bp >= 16):
        raise KernelUnsupported(f"DecodeBlocks.mma needs MIMO (R {R} > 1), a bfloat16 state "
                                f"({state.h.dtype}) and block_p >= 16 ({bp})")
    heads_per_group = H // Hq

    # grid (P blocks, heads, batch): the first axis is the fastest, so programs run in memory
    # order of h (B, H, P, N)
    def spec(block, index):
        return pl.BlockSpec(block, index)

    ins = {  # name -> (array, BlockSpec); optional ones only when present
        "q": (q, spec((SQ, R, SQ, N), lambda p, h, b: (b, 0, h // heads_per_group, 0))),
        "k": (k, spec((SQ, R, SQ, N), lambda p, h, b: (b, 0, h // heads_per_group, 0))),
        "x": (x, spec((SQ, SQ, bp), lambda p, h, b: (b, h, p))),
        "z": (z, spec((SQ, SQ, bp), lambda p, h, b: (b, h, p))),
        "log_decay": (log_decay, spec((SQ, SQ), lambda p, h, b: (b, h))),
        "gamma": (gamma, spec((SQ, SQ), lambda p, h, b: (b, h))),
        "eta": (eta, spec((SQ, SQ), lambda p, h, b: (b, h))),
        "D": (D, spec((SQ,), lambda p, h, b: (h,))),
        "k_prev": (state.k_prev, spec((SQ, R, SQ, N), lambda p, h, b: (b, 0, h, 0))),
        "x_prev": (state.x_prev, spec((SQ, SQ, bp), lambda p, h, b: (b, h, p))),
        "h": (state.h, spec((SQ, SQ, bp, N), lambda p, h, b: (b, h, p, 0))),
    }
    angle_new = k_rot = None
    if S and (blocks.xla_trig or blocks.xla_rot):  # the new angle is the state's
        keep = 1.0 if reset is None else (~reset).astype(f32)[:, None, None]
        angle_new = jnp.mod(state.angle.astype(f32) * keep + angle_inc.astype(f32), TWO_PI)
    if blocks.xla_rot:  # every head's biased q, k rotated as the XLA step does (`rotated_qk`)
        heads = per_head(SSMInputs(q[:, None], k[:, None], x[:, None], angle_inc[:, None],
                                   log_decay[:, None], gamma[:, None], eta[:, None], None,
                                   q_bias, k_bias))
        q_rot, k_rot = rotated_qk(heads.q[:, 0], heads.k[:, 0],
                                  state.angle if angle_new is None else angle_new)
        k_rot = k_rot.astype(state.k_prev.dtype)  # the state's dtype, as the kernel stores it
        del ins["q"], ins["k"]
        head = spec((SQ, R, SQ, N), lambda p, h, b: (b, 0, h, 0))
        ins["q_rot"], ins["k_rot"] = (q_rot, head), (k_rot, head)
        q_bias = k_bias = None
    elif S and blocks.xla_trig:  # the kernel gets the new angle's cos / sin
        ins["cos"] = (jnp.cos(angle_new), spec((SQ, SQ, S), lambda p, h, b: (b, h, 0)))
        ins["sin"] = (jnp.sin(angle_new), spec((SQ, SQ, S), lambda p, h, b: (b, h, 0)))
    elif S:
        ins["angle_inc"] = (angle_inc, spec((SQ, SQ, S), lambda p, h, b: (b, h, 0)))
        ins["angle"] = (state.angle, spec((SQ, SQ, S), lambda p, h, b: (b, h, 0)))
    if reset is not None:
        ins["reset"] = (reset, spec((SQ,), lambda p, h, b: (b,)))
    for name, bias in (("q_bias", q_bias), ("k_bias", k_bias)):
        if bias is not None:
            ins[name] = (bias, spec((SQ, R, N), lambda p, h, b: (h, 0, 0)))
    for name, w in (("mimo_x", mimo_x), ("mimo_z", mimo_z), ("mimo_o", mimo_o)):
        if w is not None:
            ins[name] = (w, spec((SQ, R, bp), lambda p, h, b: (h, 0, p)))
    if norm_weight is not None:
        ins["norm_weight"] = (norm_weight, spec((SQ, bp), lambda p, h, b: (h, p)))

    outs = {  # name -> (ShapeDtypeStruct, BlockSpec)
        "out": (jax.ShapeDtypeStruct((B, H, P), f32), ins["x"][1]),
        "h_out": (jax.ShapeDtypeStruct(state.h.shape, state.h.dtype), ins["h"][1]),
        "k_prev_out": (jax.ShapeDtypeStruct(state.k_prev.shape, state.k_prev.dtype),
                       ins["k_prev"][1]),
        "x_prev_out": (jax.ShapeDtypeStruct(state.x_prev.shape, state.x_prev.dtype),
                       ins["x_prev"][1]),
    }
    if S and angle_new is None:
        outs["angle_out"] = (jax.ShapeDtypeStruct(state.angle.shape, f32), ins["angle"][1])
    if blocks.xla_rot:  # XLA's k is the new k_prev
        del outs["k_prev_out"]

    in_names, out_names = tuple(ins), tuple(outs)
    kernel = functools.partial(
        _decode_kernel, in_names=in_names, out_names=out_names, R=R, N=N, S=S,
        has_norm=norm_weight is not None, eps=float(norm_eps), interpret=bool(interpret),
        evict_first=blocks.evict_first and not interpret, fast_trig=blocks.fast_trig,
        mma=blocks.mma, late_barrier=blocks.late_barrier)
    results = pl.pallas_call(
        kernel,
        grid=(P // bp, H, B),
        in_specs=[s for _, s in ins.values()],
        out_specs=[s for _, s in outs.values()],
        out_shape=[a for a, _ in outs.values()],
        input_output_aliases={in_names.index("h"): out_names.index("h_out")},
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(blocks.num_warps, 1),
        name="mamba3_decode",
    )(*(a for a, _ in ins.values()))
    res = dict(zip(out_names, results, strict=True))
    angle = state.angle if not S else res["angle_out"] if angle_new is None else angle_new
    new = SSMState(angle=angle, h=res["h_out"],
                   k_prev=k_rot if blocks.xla_rot else res["k_prev_out"],
                   x_prev=res["x_prev_out"])
    return res["out"], new
