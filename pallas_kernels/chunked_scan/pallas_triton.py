"""The chunked SSM core as chunk-parallel Pallas Triton kernels, forward and backward.

The core (the SSD part of `mamba3_jax.ops.ssm.ssm_chunked`, on rows) takes per-head rotated q, k
(B, Lp R, H, N), lifted inputs v (B, Lp R, H, P), per-row scalars cs (chunk-local cumulative log
decay), sc (trapezoid scale), gm (gamma) (B, H, Lp R), chunk-local segment ids (B, Lp R) and the
augmented initial state g0 (B, H, P, N); it returns y (B, Lp R, H, P) in the input dtype and
the final state (float32). Four kernels, so that only a thin pass runs sequentially over chunks:

  forward   `_state_kernel`   grid (B, H, P / bp), chunks in order: the state entering every
                              chunk (stored in the input dtype: it is only a matmul operand) and
                              the final state; one (bp x CR) @ (CR x N) dot per chunk.
            `_output_kernel`  grid (B, H, chunks), one program per chunk: masked q k^T, @ v,
                              plus the readout of the state entering the chunk.
  backward  `_dstate_kernel`  grid (B, H, P / bp), chunks in reverse: the state gradient
                              leaving every chunk and d g0; one dot per chunk.
            `_grad_kernel`    grid (B, H, chunks): dq, dk, dv and the per-row scalar gradients
                              (d cs, d sc, d gm) of one chunk from the saved state entering it
                              and the state gradient leaving it.

Rows are (token, rank) pairs (MIMO rank R: CR = C R rows per chunk); masks compare tokens
(row // R). Every dot takes input-dtype operands (bf16 on tensor cores) with float32
accumulation; float32 inputs use `dot_precision`'s mode. Masks, decays and scalar gradients are
float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mamba3_jax.ops.mixer import skip_gate, skip_gate_grads
from pallas_kernels._compat import SQ, compiler_params, dot, dot_precision
from pallas_kernels.chunked_scan import pallas_mosaic_gpu

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
    """Launch parameters. bp: head-dim block of the two sequential passes (more programs for
    small B H); warps/stages per kernel."""

    # P rows per program of the two sequential passes; 0: `auto_bp` (16 where B H is small)
    bp: int = 0
    warps_state: int = 4
    stages_state: int = 2
    warps_output: int = 4
    stages_output: int = 2
    warps_dstate: int = 4
    stages_dstate: int = 2
    warps_grad: int = 4  # dk, dv (8 warps compile without spills but were 0.3 ms slower, H200)
    stages_grad: int = 1
    split_grad: int = 1  # per-chunk gradient kernels: 0 one, 1 dq | dk dv, 2 dq | dk | dv
    warps_grad_dq: int = 4
    warps_rotary: int = 4
    # tokens per rotation program (0: the core's chunk; prepare_rows). 16 (2 warps): fwd+bwd
    # 2.35-2.39 vs 2.56 ms at B8 L2048 H32, 5.18 vs 5.65 at B1 L16384 H64 on an H200 (session 6)
    rotary_chunk: int = 16
    # 1: outside autodiff, SISO without RMSNorm: D and the gate in the output kernel's epilogue
    # (the output is written once, gated, instead of y then an XLA pass over y, x and z).
    inference_gate: int = 1
    # 1: outside autodiff, MIMO rotates q, k in XLA (per-head rows from an XLA fusion) instead
    # of the rotation kernel: 1.90 vs 2.29 ms at B8 L2048 H32 R4 on an H200; under autodiff
    # the kernel's rotation stays (fwd+bwd 9.27 vs 10.03 ms with XLA's)
    mimo_xla_rotation: int = 1
    # The rotation kernels take the increments' factors (`SSMInputs.angle_rate`, `angle_dt`,
    # when the caller gives them) and form rate * dt per head in registers, so XLA neither
    # writes the (B, L, H, S) float32 increments nor reduces their gradient over S for d dt.
    # 1: SISO only, 2: MIMO too, 0: never. H200 (session 7), fwd+bwd: SISO 2.27 vs 2.39 ms
    # (B8 L2048 H32), 4.48 vs 4.63 (H64), 5.03 vs 5.14 (B1 L16384); 180M step 750 vs 755 ms;
    # but MIMO R4 9.63 vs 9.27 ms, so MIMO keeps the (B, L, H, S) increments by default
    factored_angles: int = 1
    angle_mode: str = "tf32x3"  # rotation kernels' prefix-sum dots: 'tf32x3' or 'ieee'
    # 1: the rotation kernels' cos / sin from the MUFU approximations after a range reduction
    # (`_compat.sincos`, ~1e-6 absolute) instead of libdevice's accurate sinf / cosf (integer
    # range reduction: most of the rotation kernels' instructions, offline SASS). H200 (session
    # 12, same call): fwd 0.638 -> 0.630 ms (B8 L2048 H32), 1.110 -> 1.062 (H64); fwd+bwd 2.377
    # -> 2.288, 5.035 -> 4.949 (B1 L16384); MIMO R4 fwd+bwd 9.319 -> 9.076; 180M step 496 -> 491
    fast_trig: int = 1
    # 1: with factored angles, when the caller gives `SSMInputs.angle_pre`, the rotation kernels
    # read it and form pi tanh in registers (0: they read the float32 `angle_rate`). H200
    # (session 12, with fast_trig): fwd 0.630 -> 0.547 ms (B8 L2048 H32), 1.360 -> 1.234
    # (B1 L16384); fwd+bwd 2.288 -> 2.207 (H32), 4.520 -> 4.420 (H64), 4.949 -> 5.030 (B1 L16384).
    # (A custom VJP for XLA's chunk totals that formed pi tanh again in the backward instead of
    # storing the float32 rate timed level with this in session 18: removed.)
    pre_angles: int = 1
    # 1: the chunk output kernel as a Pallas Mosaic GPU kernel (`pallas_mosaic_gpu`: TMA, wgmma)
    # where it covers the shape (bf16 / f16 SISO, 64-token chunks), the Triton one elsewhere;
    # besides, for the inference forward (SISO, factored angles, S a multiple of 32):
    # 2: no per-head rows at all, a Mosaic state pass and a Mosaic output kernel that rotate
    # the group's q, k themselves; 3: the Triton rotation of k alone and state pass, then
    # that rotating Mosaic output kernel (no q rows at all). H200 (session 13), fwd at B8
    # L2048 H32 / H64 / B1 L16384: 1 within 3-4% of the Triton kernel; 2 1.9-2.5x slower (its
    # state pass walks the chunks in one CTA per head); 3 not yet timed. Off until one wins
    mosaic_output: int = 0
    # the Mosaic state pass (mosaic_output=2): 2 copies the next chunk's tiles in while one is
    # computed, 1 waits for each chunk's own copies
    mosaic_stages: int = 2
    f32_mode: str = "tf32x3"
    # 1: the training path's core and its skip and gate (SISO without RMSNorm) as one custom
    # VJP (`ssd_core_gated`): the gate's backward in one XLA pass before the kernels and D dy
    # added to dv in the dk/dv kernel, where XLA ran it in two passes around the kernels (dy
    # before, 0.1 ms; dz, dx and dD after, 0.214 ms, at B8 L2048 H64 in session 17's compiled
    # HLO). Opt-in until timed
    core_gate: int = 0
    # > 1: the two sequential passes form this many chunks' own shares (loads and the dot, which
    # do not depend on the carried state) before stepping the state through them, so those are
    # in flight together and only an FMA and a store per chunk stay in the chain. Their time at
    # small B H is that chain (1.7 us a chunk at B1 L16384 H64, session 17). Applies where the
    # P block is <= 16 rows (`auto_bp` at small B H); offline sm_90a at B1 L16384 H64: 2 takes
    # the state pass 146 -> 148 registers and dstate 96 -> 190, no spills (u = 4: dstate spills).
    # Opt-in until timed
    pass_unroll: int = 1


def parse_blocks(spec: str) -> TritonBlocks:
    """'field=value;field=value' (or '' / 'ours': the defaults) -> TritonBlocks."""
    fields = {f.name for f in dataclasses.fields(TritonBlocks)}
    kw = {}
    for item in [i for i in spec.split(";") if i.strip()] if spec != "ours" else []:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in fields:
            raise ValueError(f"bad TritonBlocks option {item!r} in {spec!r}: want field=value "
                             f"with a field from {sorted(fields)}")
        kw[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return TritonBlocks(**kw)


# Below this many (batch, head) programs the sequential passes split P into blocks of 16 rows.
# H200 (session 17, docs/benchmarks.md), fwd+bwd ms for bp = P / 32 / 16: B1 L16384 H64 (64
# programs) 5.003 / 4.914 / 4.744, forward 1.241 / 1.305 / 1.240; B8 L2048 H32 (256) 2.280 /
# 2.533 / 2.388 and H64 (512) 4.447 / 4.565 / 4.799: whole P there.
SMALL_BH = 128


def auto_bp(bh: int, P: int) -> int:
    """The sequential passes' P block when `TritonBlocks.bp` is 0."""
    return P if bh >= SMALL_BH else min(16, P)


def default_blocks() -> TritonBlocks:
    """TritonBlocks(), or the fields set in $MAMBA3_TRITON_BLOCKS (e.g. 'factored_angles=1'):
    how a whole training run or benchmark tries a kernel option without code changes."""
    return parse_blocks(os.environ.get("MAMBA3_TRITON_BLOCKS", ""))


@dataclasses.dataclass(frozen=True)
class CoreShape:
    """Static description of one core call (hashable: a nondiff argument of the custom_vjp)."""

    B: int
    H: int
    nc: int
    C: int  # tokens per chunk
    R: int
    N: int
    P: int
    cdt: str
    interpret: bool
    blocks: TritonBlocks
    gate: bool = False  # forward only: the output kernel applies D and silu(z) (SISO)

    @property
    def CR(self) -> int:
        return self.C * self.R

    @property
    def bp(self) -> int:
        return self.blocks.bp or auto_bp(self.B * self.H, self.P)

    @property
    def pass_unroll(self) -> int:
        """`TritonBlocks.pass_unroll` where the P block is at most 16 rows (at whole P the
        unrolled chunks' tiles spill, compile_check: 255 registers), else 1."""
        return self.blocks.pass_unroll if self.bp <= 16 else 1

    @property
    def prec(self):
        return dot_precision(self.cdt, self.interpret, self.blocks.f32_mode)

    def params(self, warps: int, stages: int):
        return None if self.interpret else compiler_params(warps, stages)


# ----------------------------------------------------------------------------- in-kernel helpers


def _last(v):
    """Last element of a 1-D tensor as a scalar (a masked sum: Triton has no scalar indexing)."""
    idx = jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
    return jnp.sum(jnp.where(idx == v.shape[0] - 1, v, jnp.zeros_like(v)))


def _chunk_decays(cs, seg):
    """Per-row decays of one chunk: e (state entering -> row), to_end (row -> chunk end, without
    the scale) and the whole-chunk decay (scalar). A reset cuts them."""
    cl, sl = _last(cs), _last(seg)
    e = jnp.where(seg == 0, jnp.exp(cs), 0.0)
    to_end = jnp.where(seg == sl, jnp.exp(cl - cs), 0.0)
    dec = jnp.where(sl == 0, jnp.exp(cl), 0.0)
    return e, to_end, dec


def _decays(cs, seg, R: int):
    """The strict decay part exp(cs_i - cs_j) for an earlier token of the same segment (else 0)
    and the same-token mask (all rank pairs) of one chunk's rows."""
    n = cs.shape[0]
    ti = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) // R
    tj = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1) // R
    strict = (ti > tj) & (seg[:, None] == seg[None, :])
    return jnp.exp(jnp.where(strict, cs[:, None] - cs[None, :], -jnp.inf)), ti == tj


def _mix(expo, diag, sc, gm):
    """W[i, j] = exp(cs_i - cs_j) sc_j off the diagonal tokens, gm_i on them."""
    return expo * sc[None, :] + jnp.where(diag, gm[:, None], 0.0)


def _weights(cs, sc, gm, seg, R: int):
    """W (`_mix`), the strict decays and the same-token mask of one chunk."""
    expo, diag = _decays(cs, seg, R)
    return _mix(expo, diag, sc, gm), expo, diag


def _silu_gated(y, z):
    """y * silu(z), float32 (z in any dtype)."""
    zf = z.astype(f32)
    return y * zf / (1.0 + jnp.exp(-zf))


# ----------------------------------------------------------------------------- forward


def _unrolled_chain(n: int, unroll: int, emit, local, carry):
    """For i in 0..n-1: emit(i, carry) (the stores of what enters step i), then carry <- dec *
    carry + share with (dec, share) = local(i), which does not depend on the carry. With unroll
    > 1, `unroll` steps' local parts (their loads and dot) are formed before those steps, so
    they are in flight together and only the stores and an FMA per step stay in the chain
    (`TritonBlocks.pass_unroll`)."""
    def one(i, carry):
        emit(i, carry)
        dec, share = local(i)
        return dec * carry + share

    def group(g, carry):
        parts = [local(g * unroll + j) for j in range(unroll)]
        for j, (dec, share) in enumerate(parts):
            emit(g * unroll + j, carry)
            carry = dec * carry + share
        return carry

    if unroll <= 1:
        return jax.lax.fori_loop(0, n, one, carry)
    full = n // unroll
    carry = jax.lax.fori_loop(0, full, group, carry) if full else carry
    return jax.lax.fori_loop(full * unroll, n, one, carry) if n % unroll else carry


def _state_kernel(k_ref, v_ref, cs_ref, sc_ref, sg_ref, g0_ref, st_ref, gl_ref, *, cs_: CoreShape):
    CR, cdt, prec = cs_.CR, jnp.dtype(cs_.cdt), cs_.prec

    def emit(c, g):  # the state entering chunk c
        st_ref[c] = g.astype(st_ref.dtype)

    def local(c):  # chunk c's decay and its own share of the state leaving it
        rows = pl.ds(pl.multiple_of(c * CR, CR), CR)
        cs, sc, seg = cs_ref[rows], sc_ref[rows], sg_ref[rows]
        _, to_end, dec = _chunk_decays(cs, seg)
        kw = (k_ref[rows, :].astype(f32) * (to_end * sc)[:, None]).astype(cdt)
        return dec, dot(v_ref[rows, :], kw, ta=True, precision=prec)

    gl_ref[...] = _unrolled_chain(cs_.nc, cs_.pass_unroll, emit, local,
                                  g0_ref[...].astype(f32))


def _output_kernel(q_ref, k_ref, v_ref, cs_ref, sc_ref, gm_ref, sg_ref, st_ref, *refs,
                   cs_: CoreShape):
    """refs: (y,) or, with `cs_.gate`, (z, D, out): out = (y + D v) silu(z) (SISO: v is x)."""
    cdt, prec = jnp.dtype(cs_.cdt), cs_.prec
    q = q_ref[...]
    cs, seg = cs_ref[...], sg_ref[...]
    W, _, _ = _weights(cs, sc_ref[...], gm_ref[...], seg, cs_.R)
    s = dot(q, k_ref[...], tb=True, precision=prec)
    v = v_ref[...]
    y = dot((s * W).astype(cdt), v, precision=prec)
    e = jnp.where(seg == 0, jnp.exp(cs), 0.0)
    y = y + e[:, None] * dot(q, st_ref[...], tb=True, precision=prec)
    if cs_.gate:
        z_ref, d_ref, y_ref = refs
        # y rounded to the input dtype first, as the unfused path stores it
        y = _silu_gated(y.astype(cdt).astype(f32) + d_ref[...][None, :] * v.astype(f32),
                        z_ref[...])
    else:
        (y_ref,) = refs
    y_ref[...] = y.astype(y_ref.dtype)


def _row_spec(cs_: CoreShape, width: int):  # one chunk of rows of one head
    return pl.BlockSpec((SQ, cs_.CR, SQ, width), lambda b, h, c: (b, c, h, 0))


def _pass_out_specs(cs_: CoreShape):
    """A sequential pass's outputs, P-blocked: one state per chunk and the end state."""
    nc, bp, N = cs_.nc, cs_.bp, cs_.N
    return [pl.BlockSpec((SQ, SQ, nc, bp, N), lambda b, h, p: (b, h, 0, p, 0)),
            pl.BlockSpec((SQ, SQ, bp, N), lambda b, h, p: (b, h, p, 0))]


def _pass_out_shapes(cs_: CoreShape):
    """Per-chunk states in the input dtype (only ever a matmul operand), end state in f32."""
    B, H, P, N = cs_.B, cs_.H, cs_.P, cs_.N
    return [jax.ShapeDtypeStruct((B, H, cs_.nc, P, N), jnp.dtype(cs_.cdt)),
            jax.ShapeDtypeStruct((B, H, P, N), f32)]


def state_pass(cs_: CoreShape, k, v, cs, sc, seg, g0):
    """The sequential pass: the state entering every chunk (B, H, nc, P, N) in the input dtype
    and the final state (B, H, P, N) float32."""
    B, H, nc, CR, N, P, bp = cs_.B, cs_.H, cs_.nc, cs_.CR, cs_.N, cs_.P, cs_.bp
    Lr = nc * CR
    kseq = pl.BlockSpec((SQ, Lr, SQ, N), lambda b, h, p: (b, 0, h, 0))
    vseq = pl.BlockSpec((SQ, Lr, SQ, bp), lambda b, h, p: (b, 0, h, p))
    sseq = pl.BlockSpec((SQ, SQ, Lr), lambda b, h, p: (b, h, 0))
    gseq = pl.BlockSpec((SQ, Lr), lambda b, h, p: (b, 0))
    states, g_last = pl.pallas_call(
        functools.partial(_state_kernel, cs_=cs_),
        grid=(B, H, P // bp),
        in_specs=[kseq, vseq, sseq, sseq, gseq,
                  pl.BlockSpec((SQ, SQ, bp, N), lambda b, h, p: (b, h, p, 0))],
        out_specs=_pass_out_specs(cs_),
        out_shape=_pass_out_shapes(cs_),
        interpret=cs_.interpret,
        compiler_params=cs_.params(cs_.blocks.warps_state, cs_.blocks.stages_state),
        name="mamba3_ssd_state",
    )(k, v, cs, sc, seg, g0)
    return states, g_last


def forward(cs_: CoreShape, q, k, v, cs, sc, gm, seg, g0, z=None, D=None):
    """y (or with `cs_.gate`, the gated output from z (B, Lr, H, P) and D (H, P) float32), the
    per-chunk states and the final state."""
    B, H, nc, CR, N, P = cs_.B, cs_.H, cs_.nc, cs_.CR, cs_.N, cs_.P
    Lr = nc * CR
    cdt = jnp.dtype(cs_.cdt)
    states, g_last = state_pass(cs_, k, v, cs, sc, seg, g0)
    if cs_.blocks.mosaic_output and pallas_mosaic_gpu.covers(cs_.C, cs_.R, cs_.N, cs_.P,
                                                             cs_.cdt):
        y = pallas_mosaic_gpu.output(q, k, v, cs, sc, gm, seg, states,
                                     *((z, D) if cs_.gate else ()), interpret=cs_.interpret)
        return y, states, g_last
    rows = pl.BlockSpec((SQ, SQ, CR), lambda b, h, c: (b, h, c))
    gate_specs, gate_args = [], ()
    if cs_.gate:
        gate_specs = [_row_spec(cs_, P), pl.BlockSpec((SQ, P), lambda b, h, c: (h, 0))]
        gate_args = (z, D)
    y = pl.pallas_call(
        functools.partial(_output_kernel, cs_=cs_),
        grid=(B, H, nc),
        in_specs=[_row_spec(cs_, N), _row_spec(cs_, N), _row_spec(cs_, P), rows, rows, rows,
                  pl.BlockSpec((SQ, CR), lambda b, h, c: (b, c)),
                  pl.BlockSpec((SQ, SQ, SQ, P, N), lambda b, h, c: (b, h, c, 0, 0))]
        + gate_specs,
        out_specs=_row_spec(cs_, P),
        out_shape=jax.ShapeDtypeStruct((B, Lr, H, P), cdt),  # bf16 y: half the bytes
        interpret=cs_.interpret,
        compiler_params=cs_.params(cs_.blocks.warps_output, cs_.blocks.stages_output),
        name="mamba3_ssd_output",
    )(q, k, v, cs, sc, gm, seg, states, *gate_args)
    return y, states, g_last


# ----------------------------------------------------------------------------- backward


def _dstate_kernel(q_ref, dy_ref, cs_ref, sg_ref, st_ref, dgl_ref, dst_ref, dg0_ref, ddec_ref, *,
                   cs_: CoreShape):
    CR, nc, cdt, prec = cs_.CR, cs_.nc, jnp.dtype(cs_.cdt), cs_.prec

    def emit(i, dG):  # chunk c = nc - 1 - i: the gradient of the state leaving it
        c = nc - 1 - i
        dst_ref[c] = dG.astype(dst_ref.dtype)
        # d(chunk decay) = <dG leaving, state entering> (this P block's share)
        ddec_ref[c] = jnp.sum(dG * st_ref[c].astype(f32))

    def local(i):  # chunk c's decay and its share of the gradient of the state entering it
        c = nc - 1 - i
        rows = pl.ds(pl.multiple_of(c * CR, CR), CR)
        cs, seg = cs_ref[rows], sg_ref[rows]
        e, _, dec = _chunk_decays(cs, seg)
        dye = (dy_ref[rows, :].astype(f32) * e[:, None]).astype(cdt)
        return dec, dot(dye, q_ref[rows, :], ta=True, precision=prec)

    dg0_ref[...] = _unrolled_chain(nc, cs_.pass_unroll, emit, local,
                                   dgl_ref[...].astype(f32))


def _grad_kernel(q_ref, k_ref, v_ref, cs_ref, sc_ref, gm_ref, sg_ref, st_ref, dst_ref, dy_ref,
                 *out_refs, cs_: CoreShape, part: str, skip: bool = False):
    """One chunk's gradients. `part` names what this kernel computes, any of 'q', 'k', 'v' (one
    kernel or several: fewer live tiles per kernel). Outputs: the named gradients in q, k, v
    order, then this part's share of d cs and (with 'k' or 'v') of d sc, then d gm with 'k'.
    skip: the first ref is D (P,) of the head and dv gets D dy too (the skip term D v of
    `ssd_core_gated`, whose output is (y + D v) silu(z))."""
    d_ref, out_refs = (out_refs[0], out_refs[1:]) if skip else (None, out_refs)
    cdt, prec, CR = jnp.dtype(cs_.cdt), cs_.prec, cs_.CR
    cs, sc, gm, seg = cs_ref[...], sc_ref[...], gm_ref[...], sg_ref[...]
    e, to_end, _ = _chunk_decays(cs, seg)
    te = to_end * sc
    dyc = dy_ref[...].astype(cdt)
    expo, diag = _decays(cs, seg, cs_.R)
    outs = list(out_refs)
    grad_refs = {x: outs.pop(0) for x in "qkv" if x in part}  # outputs in q, k, v order
    dcs = jnp.zeros((CR,), f32)
    dsc = jnp.zeros((CR,), f32)
    row = jax.lax.broadcasted_iota(jnp.int32, (CR,), 0)
    # The (CR, CR) float32 tiles first, ordered so that few are live at once (registers): the
    # scores s and d(masked scores) dA, the scalar gradients from dA * s, then the weights W
    # and the two products the dots need, in the input dtype, before any (CR, N) accumulator.
    if "k" in part or "v" in part:
        s = dot(q_ref[...], k_ref[...], tb=True, precision=prec)
    if "q" in part or "k" in part:
        dA = dot(dyc, v_ref[...], tb=True, precision=prec)
    if "k" in part:  # through the decays, the trapezoid scale and gamma inside the scores
        dW = dA * s
        dgm = jnp.sum(jnp.where(diag, dW, 0.0), axis=1)
        dWe = dW * expo  # strict part, before the key scale
        dsc = dsc + jnp.sum(dWe, axis=0)
        dWs = dWe * sc[None, :]
        dcs = dcs + jnp.sum(dWs, axis=1) - jnp.sum(dWs, axis=0)
    W = _mix(expo, diag, sc, gm)
    if "v" in part:
        sW = (s * W).astype(cdt)  # the masked scores
    if "q" in part or "k" in part:
        dAW = (dA * W).astype(cdt)
    if "q" in part:  # through the intra-chunk scores and the readout of the state entering
        dyG = dot(dyc, st_ref[...], precision=prec)  # (CR, N): dy @ state entering the chunk
        dq = dot(dAW, k_ref[...], precision=prec) + e[:, None] * dyG
        grad_refs["q"][...] = dq.astype(q_ref.dtype)
        dcs = dcs + e * jnp.sum(dyG * q_ref[...].astype(f32), axis=1)
    if "v" in part:  # through the masked scores' product and the chunk's share of the next
        # state; before dk, so that k's tile and sW are dead when dk's accumulator is live
        kdg = dot(k_ref[...], dst_ref[...], tb=True, precision=prec)  # (CR, P)
        dv = dot(sW, dyc, ta=True, precision=prec) + te[:, None] * kdg
        if skip:
            dv = dv + d_ref[...][None, :] * dyc.astype(f32)
        grad_refs["v"][...] = dv.astype(v_ref.dtype)
        dte = jnp.sum(kdg * v_ref[...].astype(f32), axis=1)  # d(to_end * sc) per row
        dsc = dsc + to_end * dte
        dcs = dcs - te * dte + jnp.where(row == CR - 1, jnp.sum(te * dte), 0.0)
    if "k" in part:  # through the scores and the chunk's share of the next state
        dk = (dot(dAW, q_ref[...], ta=True, precision=prec)
              + te[:, None] * dot(v_ref[...], dst_ref[...], precision=prec))
        grad_refs["k"][...] = dk.astype(k_ref.dtype)
    outs.pop(0)[...] = dcs
    if "k" in part or "v" in part:
        outs.pop(0)[...] = dsc
    if "k" in part:
        outs.pop(0)[...] = dgm


def backward(cs_: CoreShape, q, k, v, cs, sc, gm, seg, states, dy, dgl, D=None):
    """The core's VJP; with D (H, P) float32, dv also gets D dy (`ssd_core_gated`)."""
    B, H, nc, CR, N, P, bp = cs_.B, cs_.H, cs_.nc, cs_.CR, cs_.N, cs_.P, cs_.bp
    Lr = nc * CR
    nP = P // bp
    sseq = pl.BlockSpec((SQ, SQ, Lr), lambda b, h, p: (b, h, 0))
    dstates, dg0, ddec = pl.pallas_call(
        functools.partial(_dstate_kernel, cs_=cs_),
        grid=(B, H, nP),
        in_specs=[pl.BlockSpec((SQ, Lr, SQ, N), lambda b, h, p: (b, 0, h, 0)),
                  pl.BlockSpec((SQ, Lr, SQ, bp), lambda b, h, p: (b, 0, h, p)),
                  sseq, pl.BlockSpec((SQ, Lr), lambda b, h, p: (b, 0)),
                  pl.BlockSpec((SQ, SQ, nc, bp, N), lambda b, h, p: (b, h, 0, p, 0)),
                  pl.BlockSpec((SQ, SQ, bp, N), lambda b, h, p: (b, h, p, 0))],
        out_specs=_pass_out_specs(cs_) + [
            pl.BlockSpec((SQ, SQ, SQ, nc), lambda b, h, p: (b, h, p, 0))],
        out_shape=_pass_out_shapes(cs_) + [jax.ShapeDtypeStruct((B, H, nP, nc), f32)],
        interpret=cs_.interpret,
        compiler_params=cs_.params(cs_.blocks.warps_dstate, cs_.blocks.stages_dstate),
        name="mamba3_ssd_dstate",
    )(q, dy, cs, seg, states, dgl)

    rows = pl.BlockSpec((SQ, SQ, CR), lambda b, h, c: (b, h, c))
    chunk_state = pl.BlockSpec((SQ, SQ, SQ, P, N), lambda b, h, c: (b, h, c, 0, 0))
    in_specs = [_row_spec(cs_, N), _row_spec(cs_, N), _row_spec(cs_, P), rows, rows, rows,
                pl.BlockSpec((SQ, CR), lambda b, h, c: (b, c)), chunk_state, chunk_state,
                _row_spec(cs_, P)]
    args = (q, k, v, cs, sc, gm, seg, states, dstates, dy)
    if D is not None:
        in_specs = in_specs + [pl.BlockSpec((SQ, P), lambda b, h, c: (h, 0))]
        args = args + (D,)
    grad_out = {"q": (_row_spec(cs_, N), jax.ShapeDtypeStruct(q.shape, q.dtype)),
                "k": (_row_spec(cs_, N), jax.ShapeDtypeStruct(k.shape, k.dtype)),
                "v": (_row_spec(cs_, P), jax.ShapeDtypeStruct(v.shape, v.dtype))}
    scalar = (rows, jax.ShapeDtypeStruct((B, H, Lr), f32))

    def call(part, warps):
        outs = [grad_out[x] for x in part] + [scalar] * (1 + ("k" in part or "v" in part)
                                                        + ("k" in part))
        return pl.pallas_call(
            functools.partial(_grad_kernel, cs_=cs_, part=part, skip=D is not None),
            grid=(B, H, nc), in_specs=in_specs,
            out_specs=[o[0] for o in outs], out_shape=[o[1] for o in outs],
            interpret=cs_.interpret,
            compiler_params=cs_.params(warps, cs_.blocks.stages_grad),
            name=f"mamba3_ssd_grad_d{part}",
        )(*args)

    parts = {0: ("qkv",), 1: ("q", "kv"), 2: ("q", "k", "v")}[cs_.blocks.split_grad]
    grads, dcs, dsc = {}, 0.0, 0.0
    for part in parts:
        res = list(call(part, cs_.blocks.warps_grad_dq if part == "q" else cs_.blocks.warps_grad))
        for x in part:
            grads[x] = res.pop(0)
        dcs = dcs + res.pop(0)
        if "k" in part or "v" in part:
            dsc = dsc + res.pop(0)
        if "k" in part:
            dgm = res.pop(0)
    dq, dk, dv = grads["q"], grads["k"], grads["v"]
    # d(chunk decay) -> the last row's cs: decay = exp(cs_last) unless the chunk has a reset
    csl = cs.reshape(B, H, nc, CR)[..., -1]
    sgl = seg.reshape(B, nc, CR)[:, None, :, -1]
    dlast = jnp.where(sgl == 0, jnp.exp(csl), 0.0) * jnp.sum(ddec, axis=2)
    dcs = dcs.reshape(B, H, nc, CR).at[..., -1].add(dlast).reshape(B, H, Lr)
    return dq, dk, dv, dcs, dsc, dgm, dg0


# ----------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ssd_core(cs_: CoreShape, q, k, v, cs, sc, gm, seg, g0):
    y, _, g_last = forward(cs_, q, k, v, cs, sc, gm, seg, g0)
    return y, g_last


def _core_fwd(cs_, q, k, v, cs, sc, gm, seg, g0):
    y, states, g_last = forward(cs_, q, k, v, cs, sc, gm, seg, g0)
    return (y, g_last), (q, k, v, cs, sc, gm, seg, states)


def _core_bwd(cs_, res, cts):
    q, k, v, cs, sc, gm, seg, states = res
    dy, dgl = cts
    dq, dk, dv, dcs, dsc, dgm, dg0 = backward(cs_, q, k, v, cs, sc, gm, seg, states, dy, dgl)
    return dq, dk, dv, dcs, dsc, dgm, None, dg0


ssd_core.defvjp(_core_fwd, _core_bwd)


def _gate_rows(y, v, z, D):
    """(y + D v) silu(z) over the first L = z.shape[1] tokens: y, v (B, Lr, H, P) rows (SISO),
    z (B, L, H, P), D (H,) -> float32 (B, L, H, P)."""
    L = z.shape[1]
    return skip_gate(y[:, :L], v[:, :L], z, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ssd_core_gated(cs_: CoreShape, q, k, v, cs, sc, gm, seg, g0, z, D):
    """`ssd_core`, then the skip and gate (y + D v) silu(z) (SISO without RMSNorm: v is x),
    with one VJP for both (`TritonBlocks.core_gate`): XLA forms dy, dz and dD in one pass
    before the kernels, and the dk/dv kernel adds D dy to dv, so nothing of the gate's backward
    runs after them (XLA split it around the kernels: two passes over dout and z). Returns the
    float32 output (B, L, H, P) and the final state."""
    y, g_last = ssd_core(cs_, q, k, v, cs, sc, gm, seg, g0)
    return _gate_rows(y, v, z, D), g_last


def _gated_fwd(cs_, q, k, v, cs, sc, gm, seg, g0, z, D):
    y, states, g_last = forward(cs_, q, k, v, cs, sc, gm, seg, g0)
    return (_gate_rows(y, v, z, D), g_last), (q, k, v, cs, sc, gm, seg, states, y, z, D)


def _gated_bwd(cs_, res, cts):
    q, k, v, cs, sc, gm, seg, states, y, z, D = res
    dout, dgl = cts
    L = z.shape[1]
    du, dz, dD = skip_gate_grads(y[:, :L], v[:, :L], z, D, dout)
    dy = jnp.pad(du.astype(y.dtype), [(0, 0), (0, y.shape[1] - L), (0, 0), (0, 0)])
    Dp = jnp.broadcast_to(D.astype(f32)[:, None], (cs_.H, cs_.P))
    dq, dk, dv, dcs, dsc, dgm, dg0 = backward(cs_, q, k, v, cs, sc, gm, seg, states, dy, dgl,
                                              D=Dp)
    return dq, dk, dv, dcs, dsc, dgm, None, dg0, dz, dD


ssd_core_gated.defvjp(_gated_fwd, _gated_bwd)
