"""Chunked-scan kernels in Pallas Mosaic GPU (Hopper: TMA copies, wgmma): the chunk output
kernel (`output`), and the inference forward without per-head q, k rows (`rotating_state_pass`
and `rotating_output`, which rotate the groups' q, k themselves; docs/kernels.md).

The first kernel of the Mosaic GPU route (issue 9: Pallas Triton is deprecated, and the layout
that would beat the official kernels keeps tiles in shared memory, which Triton cannot). It
computes what `pallas_triton._output_kernel` does, for one (batch, head, chunk) per CTA of one
warpgroup:

    y = ((q k^T) * W) v + e * (q S^T)      [gated: (round(y) + D v) silu(z)]

with W the chunk's decay / trapezoid weights (`pallas_triton._mix`), e the decay from the state
entering the chunk and S that state (P, N). q, k, v, S arrive by TMA into swizzled shared
memory; the three products are wgmma with float32 accumulators; the weights are formed in the
accumulator's (WGMMA) layout from row and column vectors. `TritonBlocks.mosaic_output=1` puts it
in the forward in place of the Triton output kernel (bf16 / f16 SISO, 64-token chunks, N and P
multiples of 64); it is opt-in until timed on the GPU.

Testing without a GPU: the kernel lowers for CUDA on any host (layout errors surface there), and
runs in jax's Mosaic GPU interpreter (`InterpretGPUParams`), which in jax 0.10 has no wgmma with
a transposed operand and no layout casts: in interpret mode the three products are plain float32
dots and layouts are left to the interpreter, so the interpreter checks the copies, indexing,
weights and epilogue, and the GPU run checks the wgmma path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._compat import KernelUnsupported

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - a jax without Mosaic GPU
    plgpu = None

f32 = jnp.float32
CHUNK = 64  # one wgmma M tile of rows per CTA


def check_supported(C: int, R: int, N: int, P: int, dtype) -> None:
    """Raise KernelUnsupported unless this kernel covers the shape."""
    if plgpu is None:
        raise KernelUnsupported("this jax has no Pallas Mosaic GPU")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise KernelUnsupported(f"the Mosaic GPU output kernel takes bf16 / f16, not {dtype}")
    if R != 1 or C != CHUNK or N % 64 or P % 64:
        raise KernelUnsupported(f"the Mosaic GPU output kernel needs SISO, {CHUNK}-token chunks "
                                f"and N, P multiples of 64 (R={R}, C={C}, N={N}, P={P})")


def covers(C: int, R: int, N: int, P: int, dtype) -> bool:
    """Whether the kernels here take this shape (`check_supported` without the reason)."""
    try:
        check_supported(C, R, N, P, dtype)
    except KernelUnsupported:
        return False
    return True


def _swizzled(dtype, cols: int = 0, swizzle: int = 128):
    """Shared-memory transforms for a tile of `cols` columns (0: wide): 8-row tiles of the
    widest swizzle (32, 64 or 128 bytes, at most `swizzle`) that its rows hold, as wgmma and
    WGMMA-layout loads want (a wgmma's two shared-memory operands must share one)."""
    size = jnp.dtype(dtype).itemsize
    swizzle = swizzle if not cols else min(swizzle, cols * size)
    return plgpu.TilingTransform((8, swizzle // size)), plgpu.SwizzleTransform(swizzle)


def _tile(rows: int, cols: int, dtype, swizzle: int = 128, lead: tuple = ()):
    """A swizzled shared-memory tile (`_swizzled`), with optional leading slot dimensions."""
    return plgpu.SMEM(lead + (rows, cols), dtype, transforms=_swizzled(dtype, cols, swizzle))


def _vec(n: int, dtype=f32, lead: tuple = ()):
    return plgpu.SMEM(lead + (n,), dtype)


def _copy_in(copies, bar, first: int = 0):
    """TMA copies (source, destination) issued together, then waited for: barrier first + i
    for copy i."""
    for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, bar.at[first + i])
    for i in range(len(copies)):
        plgpu.barrier_wait(bar.at[first + i])


class _Ops:
    """The layout-bearing operations, or their plain forms for the interpreter."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def vec(self, ref, axis: int):
        """A (C,) vector laid out to broadcast along `axis` of a WGMMA-layout (C, C) tile."""
        v = ref[...]
        if self.interpret:
            return v
        return plgpu.layout_cast(v, plgpu.Layout.WGMMA.reduce(1 - axis))

    def tile(self, ref):
        """A 2-D shared-memory tile in registers, WGMMA layout."""
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)

    def iota(self, shape, dim: int):
        if self.interpret:
            return jax.lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def matmul(self, a, b_ref, shape, transpose_b: bool = False, transpose_a: bool = False):
        """a (a shared-memory ref or a value in registers) @ b_ref, either transposed (a shared-
        memory view), float32."""
        return self.matmuls([(a, b_ref)], shape, transpose_b, transpose_a)

    def matmuls(self, pairs, shape, transpose_b: bool = False, transpose_a: bool = False):
        """sum of a @ b over `pairs` (with the transposes asked), one float32 accumulator."""
        if self.interpret:
            total = 0.0
            for a, b_ref in pairs:
                a, b = a[...], b_ref[...]
                total = total + jnp.dot((a.T if transpose_a else a).astype(f32),
                                        (b.T if transpose_b else b).astype(f32))
            return total
        t = lambda ref: plgpu.transpose_ref(ref, (1, 0))  # noqa: E731

        def run(acc):
            for a, b_ref in pairs:
                plgpu.wgmma(acc, t(a) if transpose_a else a, t(b_ref) if transpose_b else b_ref)
            return acc[...]

        return pl.run_scoped(run, plgpu.ACC(shape, f32))


def _tokens(ops: _Ops, C: int, sg_s):
    """A chunk's (C, C) token indices ti, tj, its same-segment mask and its row segment ids."""
    sg_r = ops.vec(sg_s, 0)
    same = (jax.lax.broadcast_in_dim(sg_r, (C, C), [0])
            == jax.lax.broadcast_in_dim(ops.vec(sg_s, 1), (C, C), [1]))
    return ops.iota((C, C), 0), ops.iota((C, C), 1), same, sg_r


def _weights(ops: _Ops, C: int, cs_s, sc_s, gm_s, sg_s):
    """W[i, j] = exp(cs_i - cs_j) sc_j for an earlier token of the same segment, gm_i on
    i == j (`pallas_triton._mix`), and the decay e_i from the state entering the chunk."""
    rows = lambda u: jax.lax.broadcast_in_dim(u, (C, C), [0])  # noqa: E731
    cols = lambda u: jax.lax.broadcast_in_dim(u, (C, C), [1])  # noqa: E731
    cs_r, cs_c = ops.vec(cs_s, 0), ops.vec(cs_s, 1)
    ti, tj, same, sg_r = _tokens(ops, C, sg_s)
    strict = (ti > tj) & same
    expo = jnp.exp(jnp.where(strict, rows(cs_r) - cols(cs_c), -jnp.inf))
    w = expo * cols(ops.vec(sc_s, 1)) + jnp.where(ti == tj, rows(ops.vec(gm_s, 0)), 0.0)
    return w, jnp.where(sg_r == 0, jnp.exp(cs_r), 0.0)


def _finish(ops: _Ops, gate: bool, y, v_s, z_s, d_s, y_s):
    """Store y, or with `gate` (y rounded to the input dtype, as the unfused path stores it,
    + D v) silu(z)."""
    C, P = v_s.shape
    if gate:
        d = jax.lax.broadcast_in_dim(ops.vec(d_s, 1), (C, P), [1])
        u = y.astype(y_s.dtype).astype(f32) + d * v_s[...].astype(f32)
        zf = z_s[...].astype(f32)
        y = u * zf / (1.0 + jnp.exp(-zf))
    y_s[...] = y.astype(y_s.dtype)


def _body(ops: _Ops, gate: bool, q_s, k_s, v_s, st_s, cs_s, sc_s, gm_s, sg_s, z_s, d_s, y_s):
    C, P = v_s.shape
    s = ops.matmul(q_s, k_s, (C, C), transpose_b=True)
    w, e = _weights(ops, C, cs_s, sc_s, gm_s, sg_s)
    p = (s * w).astype(q_s.dtype)
    y = ops.matmul(q_s, st_s, (C, P), transpose_b=True)
    y = y * jax.lax.broadcast_in_dim(e, (C, P), [0])
    _finish(ops, gate, y + ops.matmul(p, v_s, (C, P)), v_s, z_s, d_s, y_s)


def _launch(kernel, out_type, scratch, grid, names, interpret: bool):
    """plgpu.kernel with Lane lowering semantics (jax 0.10's default; 0.11 defaults to
    Warpgroup, whose layout inference found no solution for the output kernel on the H200: the
    layouts here are the ones the kernels give), or jax's Mosaic GPU interpreter."""
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        mode = InterpretGPUParams()
    else:
        mode = None
    return plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=names,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=mode)


def output(q, k, v, cs, sc, gm, seg, states, z=None, D=None, *, interpret: bool = False):
    """The output kernel's contract (`pallas_triton.forward`): q, k (B, L, H, N) rows per head,
    v (B, L, H, P), cs, sc, gm (B, H, L) float32, seg (B, L) int32, states (B, H, nc, P, N) in the
    input dtype; with z (B, L, H, P) and D (H, P) float32 the gated output. Returns (B, L, H, P)
    in the input dtype."""
    B, L, H, N = q.shape
    P = v.shape[-1]
    nc = states.shape[2]
    C = L // nc
    check_supported(C, 1, N, P, q.dtype)
    gate = z is not None
    if gate and D is None:
        raise ValueError("the gated output needs D")
    dt = q.dtype

    def kernel(*refs):
        n_in = 10 if gate else 8
        ins, y_g, scratch = refs[:n_in], refs[n_in], refs[n_in + 1:]
        q_g, k_g, v_g, cs_g, sc_g, gm_g, sg_g, st_g = ins[:8]
        z_g, d_g = ins[8:] if gate else (None, None)
        q_s, k_s, v_s, st_s, y_s, cs_s, sc_s, gm_s, sg_s, z_s, d_s, bar = scratch
        b, h, c = (jax.lax.axis_index(n) for n in ("b", "h", "c"))
        rows = pl.ds(c * C, C)
        copies = [(q_g.at[b, rows, h], q_s), (k_g.at[b, rows, h], k_s),
                  (v_g.at[b, rows, h], v_s), (st_g.at[b, h, c], st_s),
                  (cs_g.at[b, h, rows], cs_s), (sc_g.at[b, h, rows], sc_s),
                  (gm_g.at[b, h, rows], gm_s), (sg_g.at[b, rows], sg_s)]
        if gate:
            copies += [(z_g.at[b, rows, h], z_s), (d_g.at[h], d_s)]
        _copy_in(copies, bar)
        _body(_Ops(interpret), gate, q_s, k_s, v_s, st_s, cs_s, sc_s, gm_s, sg_s, z_s, d_s, y_s)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_s, y_g.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    tile = lambda rows_, cols_: _tile(rows_, cols_, dt)  # noqa: E731
    scratch = [tile(C, N), tile(C, N), tile(C, P), tile(P, N), tile(C, P),  # q k v S y
               _vec(C), _vec(C), _vec(C), _vec(C, jnp.int32),  # cs sc gm seg
               tile(C, P), _vec(P), plgpu.Barrier(num_barriers=10)]  # z D
    args = (q, k, v, cs, sc, gm, seg.astype(jnp.int32), states)
    args += (z, D.astype(f32)) if gate else ()
    return _launch(kernel, jax.ShapeDtypeStruct((B, L, H, P), dt), scratch, (B, H, nc),
                   ("b", "h", "c"), interpret)(*args)


def _angles(ops: _Ops, C: int, S: int, rate_tanh: bool, rate_s, dt_s, carry_s, sg_s, parts):
    """theta (C, S) of one chunk and head: the segmented prefix sum of rate * dt as three
    bf16 wgmma (the increments split hi / mid / lo into the `parts` tiles: ~24 bits, as the
    Triton kernels' 3xTF32; the 0/1 matrix is exact in bf16), plus the carried angle on rows
    before the chunk's first reset."""
    rate = ops.tile(rate_s).astype(f32)
    if rate_tanh:
        rate = math.pi * jnp.tanh(rate)
    rows = lambda u: jax.lax.broadcast_in_dim(u, (C, S), [0])  # noqa: E731
    inc = rate * rows(ops.vec(dt_s, 0))
    for part in parts:  # inc = hi + mid + lo, each exact in bf16
        piece = inc.astype(jnp.bfloat16)
        part[...] = piece
        inc = inc - piece.astype(f32)
    if not ops.interpret:
        plgpu.commit_smem()  # the parts are wgmma operands
    ti, tj, same, sg_r = _tokens(ops, C, sg_s)
    tri = jnp.where((ti >= tj) & same, 1.0, 0.0).astype(jnp.bfloat16)
    theta = ops.matmuls([(tri, part) for part in parts], (C, S))
    carried = jax.lax.broadcast_in_dim(ops.vec(carry_s, 1), (C, S), [1])
    return theta + jnp.where(rows(sg_r) == 0, carried, 0.0)


def _rotate_into(ops: _Ops, blocks, bias, cos, sin, row_scale=None):
    """Group-level q or k column blocks (pair member 1, member 2[, plain channels]) + the
    head's bias blocks, rounded to the input dtype, rotated and rounded again (the rows the
    Triton path stores), optionally times a per-row scale and rounded once more (the state
    pass's k weighting), written back to the same tiles (the products' operands)."""
    dt = blocks[0].dtype
    C = blocks[0].shape[0]

    def biased(ref, b_ref):
        b = jax.lax.broadcast_in_dim(ops.vec(b_ref, 1), ref.shape, [1])
        return (ops.tile(ref).astype(f32) + b).astype(dt).astype(f32)

    a, b = biased(blocks[0], bias[0]), biased(blocks[1], bias[1])
    rows = [a * cos - b * sin, a * sin + b * cos]
    if len(blocks) > 2:
        rows.append(biased(blocks[2], bias[2]))
    for ref, value in zip(blocks, rows, strict=True):
        value = value.astype(dt)
        if row_scale is not None:
            scale = jax.lax.broadcast_in_dim(row_scale, (C, ref.shape[1]), [0])
            value = (value.astype(f32) * scale).astype(dt)
        ref[...] = value
    if not ops.interpret:
        plgpu.commit_smem()


def rotating_output(q, qb, k, kb, v, cs, sc, gm, seg, states, z, D, rate, dt, carry, *,
                    rate_tanh: bool, interpret: bool = False):
    """The gated output kernel that rotates q and k itself (no per-head rows): q, k (B, L, G, N)
    of the B/C groups and qb, kb (H, N) float32 per-head biases, all in pair-block channel order
    (`to_pair_blocks`); rate (B, L, Hr, S) (its pre-activation with `rate_tanh`) and dt (B, H, L)
    float32: the angle increments rate * dt; carry (B, nc, H, S) float32, the angle entering
    each chunk; the rest as `output` (states in pair-block order). SISO, gated (inference)."""
    B, L, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    nc = states.shape[2]
    C, S, Hr = L // nc, rate.shape[-1], rate.shape[2]
    check_supported(C, 1, N, P, q.dtype)
    if S % 16 or not 0 < 2 * S <= N or (N - 2 * S) % 16:
        raise KernelUnsupported(f"rotating output kernel: S={S}, N={N} (need S and N - 2S "
                                "multiples of 16)")
    dt_ = q.dtype
    widths = [S, S] + ([N - 2 * S] if N > 2 * S else [])
    offs = [0, S, 2 * S][:len(widths)]
    nb = len(widths)

    def kernel(*refs):
        (q_g, qb_g, k_g, kb_g, v_g, cs_g, sc_g, gm_g, sg_g, st_g, z_g, d_g, rate_g, dt_g,
         carry_g, y_g) = refs[:16]
        scr = list(refs[16:])
        q_s, k_s, st_s, qb_s, kb_s = (scr[i * nb:(i + 1) * nb] for i in range(5))
        (v_s, y_s, z_s, cs_s, sc_s, gm_s, sg_s, d_s, rate_s, dts_s, carry_s, *rest) = scr[5 * nb:]
        parts, bar = rest[:3], rest[3]
        b, h, c = (jax.lax.axis_index(n) for n in ("b", "h", "c"))
        rows = pl.ds(c * C, C)
        copies = []
        for i, (o, w) in enumerate(zip(offs, widths, strict=True)):
            cols = pl.ds(o, w)
            copies += [(q_g.at[b, rows, h // (H // G), cols], q_s[i]),
                       (k_g.at[b, rows, h // (H // G), cols], k_s[i]),
                       (st_g.at[b, h, c, :, cols], st_s[i]), (qb_g.at[h, cols], qb_s[i]),
                       (kb_g.at[h, cols], kb_s[i])]
        copies += [(v_g.at[b, rows, h], v_s), (z_g.at[b, rows, h], z_s),
                   (cs_g.at[b, h, rows], cs_s), (sc_g.at[b, h, rows], sc_s),
                   (gm_g.at[b, h, rows], gm_s), (sg_g.at[b, rows], sg_s), (d_g.at[h], d_s),
                   (rate_g.at[b, rows, h // (H // Hr)], rate_s), (dt_g.at[b, h, rows], dts_s),
                   (carry_g.at[b, c, h], carry_s)]
        _copy_in(copies, bar)
        ops = _Ops(interpret)
        theta = _angles(ops, C, S, rate_tanh, rate_s, dts_s, carry_s, sg_s, parts)
        cos, sin = jnp.cos(theta), jnp.sin(theta)
        _rotate_into(ops, q_s, qb_s, cos, sin)
        _rotate_into(ops, k_s, kb_s, cos, sin)
        s = ops.matmuls(list(zip(q_s, k_s, strict=True)), (C, C), transpose_b=True)
        w, e = _weights(ops, C, cs_s, sc_s, gm_s, sg_s)
        p = (s * w).astype(dt_)
        y = ops.matmuls(list(zip(q_s, st_s, strict=True)), (C, P), transpose_b=True)
        y = y * jax.lax.broadcast_in_dim(e, (C, P), [0]) + ops.matmul(p, v_s, (C, P))
        _finish(ops, True, y, v_s, z_s, d_s, y_s)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_s, y_g.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    tile = lambda rows_, cols_, dtype=dt_: _tile(rows_, cols_, dtype)  # noqa: E731
    scratch = ([tile(C, w) for w in widths] + [tile(C, w) for w in widths]
               + [tile(P, w) for w in widths] + [_vec(w) for w in widths]
               + [_vec(w) for w in widths]
               + [tile(C, P), tile(C, P), tile(C, P), _vec(C), _vec(C), _vec(C),
                  _vec(C, jnp.int32), _vec(P), tile(C, S, rate.dtype), _vec(C), _vec(S)]
               + [tile(C, S, jnp.bfloat16) for _ in range(3)]
               + [plgpu.Barrier(num_barriers=5 * nb + 10)])
    out_type = jax.ShapeDtypeStruct((B, L, H, P), dt_)
    return _launch(kernel, out_type, scratch, (B, H, nc), ("b", "h", "c"), interpret)(
        q, qb.astype(f32), k, kb.astype(f32), v, cs, sc, gm, seg.astype(jnp.int32), states, z,
        D.astype(f32), rate, dt.astype(f32), carry.astype(f32))


def _last(ref):
    """The last element of a (C,) shared-memory vector, as a scalar."""
    return ref[ref.shape[0] - 1]


def rotating_state_pass(k, kb, v, cs, sc, seg, g0, rate, dt, carry, *, rate_tanh: bool,
                        stages: int = 2, interpret: bool = False):
    """The sequential pass (`pallas_triton.state_pass`) rotating the group's k itself: k (B, L,
    G, N) and kb (H, N) float32 in pair-block order, v (B, L, H, P), cs, sc (B, H, L) float32,
    seg (B, L) int32, g0 (B, H, P, N) float32 in pair-block order, the angles' factors as
    `rotating_output`'s. One CTA per (batch, head) walks the chunks, the state in registers as
    column blocks; per chunk the state entering it is stored (input dtype) and
    h <- decay h + v^T (k~ to_end sc) by wgmma (v transposed as a shared-memory view). With
    `stages` 2 the next chunk's tiles are copied in while this one is computed (1: each chunk
    waits for its own copies).
    Returns the per-chunk states (B, H, nc, P, N) and the final state (B, H, P, N) float32."""
    B, L, G, N = k.shape
    H, P = v.shape[2], v.shape[3]
    C, S, Hr = CHUNK, rate.shape[-1], rate.shape[2]
    nc = L // C
    check_supported(C, 1, N, P, k.dtype)
    if stages not in (1, 2):
        raise KernelUnsupported(f"stages must be 1 or 2, got {stages}")
    dt_ = k.dtype
    widths = [S, S] + ([N - 2 * S] if N > 2 * S else [])
    offs = [0, S, 2 * S][:len(widths)]
    nb = len(widths)
    per_chunk = nb + 7  # copies per chunk: k blocks, v, cs, sc, seg, rate, dt, carry

    def kernel(*refs):
        k_g, kb_g, v_g, cs_g, sc_g, sg_g, g0_g, rate_g, dt_g, carry_g, st_g, gl_g = refs[:12]
        scr = list(refs[12:])
        k_s, kb_s, st_s, g_s = (scr[i * nb:(i + 1) * nb] for i in range(4))
        v_s, cs_s, sc_s, sg_s, rate_s, dts_s, carry_s, *rest = scr[4 * nb:]
        parts, bar = rest[:3], rest[3]
        b, h = jax.lax.axis_index("b"), jax.lax.axis_index("h")
        ops = _Ops(interpret)
        cols = [pl.ds(o, w) for o, w in zip(offs, widths, strict=True)]

        def chunk_refs(slot):  # the per-chunk tiles of one slot, in copy order
            return [r.at[slot] for r in k_s] + [r.at[slot] for r in (
                v_s, cs_s, sc_s, sg_s, rate_s, dts_s, carry_s)]

        def start(c, slot):  # issue chunk c's copies into `slot`
            rows = pl.ds(c * C, C)
            srcs = ([k_g.at[b, rows, h // (H // G), c_] for c_ in cols]
                    + [v_g.at[b, rows, h], cs_g.at[b, h, rows], sc_g.at[b, h, rows],
                       sg_g.at[b, rows], rate_g.at[b, rows, h // (H // Hr)],
                       dt_g.at[b, h, rows], carry_g.at[b, c, h]])
            for i, (src, dst) in enumerate(zip(srcs, chunk_refs(slot), strict=True)):
                plgpu.copy_gmem_to_smem(src, dst, bar.at[2 * nb + slot * per_chunk + i])

        def wait(slot):
            for i in range(per_chunk):
                plgpu.barrier_wait(bar.at[2 * nb + slot * per_chunk + i])

        _copy_in([(kb_g.at[h, c_], kb_s[i]) for i, c_ in enumerate(cols)]
                 + [(g0_g.at[b, h, :, c_], g_s[i]) for i, c_ in enumerate(cols)], bar)
        g = tuple(ops.tile(r) for r in g_s)
        if stages == 2:
            start(0, 0)

        def chunk(c, g):
            slot = c % stages
            if stages == 1:
                start(c, 0)
            wait(slot)
            if stages == 2:  # the other slot's chunk (c - 1) is done: fetch c + 1 into it
                @pl.when(c + 1 < nc)
                def _():
                    start(c + 1, 1 - slot)
            k_c, (v_c, cs_c, sc_c, sg_c, rate_c, dts_c, carry_c) = (
                chunk_refs(slot)[:nb], chunk_refs(slot)[nb:])
            plgpu.wait_smem_to_gmem(0)  # the last chunk's state has left st_s
            for blk, tile in zip(g, st_s, strict=True):  # the state entering this chunk
                tile[...] = blk.astype(dt_)
            plgpu.commit_smem()
            for i, c_ in enumerate(cols):
                plgpu.copy_smem_to_gmem(st_s[i], st_g.at[b, h, c, :, c_])
            theta = _angles(ops, C, S, rate_tanh, rate_c, dts_c, carry_c, sg_c, parts)
            # to_end_t sc_t scales row t of k~; the chunk's decay carries the state over it
            cl, sl = _last(cs_c), _last(sg_c)
            cs_r, sg_r = ops.vec(cs_c, 0), ops.vec(sg_c, 0)
            scale = jnp.where(sg_r == sl, jnp.exp(cl - cs_r), 0.0) * ops.vec(sc_c, 0)
            _rotate_into(ops, k_c, kb_s, jnp.cos(theta), jnp.sin(theta), row_scale=scale)
            dec = jnp.where(sl == 0, jnp.exp(cl), 0.0)
            return tuple(dec * blk + ops.matmul(v_c, tile, (P, w), transpose_a=True)
                         for blk, tile, w in zip(g, k_c, widths, strict=True))

        g = jax.lax.fori_loop(0, nc, chunk, g)
        plgpu.wait_smem_to_gmem(0)
        for blk, tile in zip(g, g_s, strict=True):
            tile[...] = blk
        plgpu.commit_smem()
        for i, c_ in enumerate(cols):
            plgpu.copy_smem_to_gmem(g_s[i], gl_g.at[b, h, :, c_])
        plgpu.wait_smem_to_gmem(0)

    # v^T (shared memory) times each k block: one swizzle for all of them
    sw = min(128, S * jnp.dtype(dt_).itemsize)
    st = (stages,)
    scratch = ([_tile(C, w, dt_, sw, st) for w in widths] + [_vec(w) for w in widths]
               + [_tile(P, w, dt_) for w in widths] + [_tile(P, w, f32) for w in widths]
               + [_tile(C, P, dt_, sw, st), _vec(C, lead=st), _vec(C, lead=st),
                  _vec(C, jnp.int32, st), _tile(C, S, rate.dtype, lead=st), _vec(C, lead=st),
                  _vec(S, lead=st)]
               + [_tile(C, S, jnp.bfloat16) for _ in range(3)]
               + [plgpu.Barrier(num_barriers=2 * nb + stages * per_chunk)])
    out_type = (jax.ShapeDtypeStruct((B, H, nc, P, N), dt_),
                jax.ShapeDtypeStruct((B, H, P, N), f32))
    return _launch(kernel, out_type, scratch, (B, H), ("b", "h"), interpret)(
        k, kb.astype(f32), v, cs, sc, seg.astype(jnp.int32), g0.astype(f32), rate,
        dt.astype(f32), carry.astype(f32))
