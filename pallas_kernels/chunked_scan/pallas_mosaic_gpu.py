"""The chunk output kernel as a Pallas Mosaic GPU kernel (Hopper: TMA copies, wgmma).

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


def _swizzled(dtype):
    """Shared-memory transforms for a wgmma operand tile: 8 rows x 128 bytes, 128B swizzle."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(128))


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

    def iota(self, shape, dim: int):
        if self.interpret:
            return jax.lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def matmul(self, a, b_ref, shape, transpose_b: bool = False):
        """a (a shared-memory ref or a value in registers) @ b_ref (or its transpose), float32."""
        if self.interpret:
            b = b_ref[...]
            return jnp.dot(a[...].astype(f32), (b.T if transpose_b else b).astype(f32))

        def run(acc):
            plgpu.wgmma(acc, a, plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref)
            return acc[...]

        return pl.run_scoped(run, plgpu.ACC(shape, f32))


def _body(ops: _Ops, gate: bool, q_s, k_s, v_s, st_s, cs_s, sc_s, gm_s, sg_s, z_s, d_s, y_s):
    C, P = v_s.shape
    rows = lambda u: jax.lax.broadcast_in_dim(u, (C, C), [0])  # noqa: E731
    cols = lambda u: jax.lax.broadcast_in_dim(u, (C, C), [1])  # noqa: E731
    s = ops.matmul(q_s, k_s, (C, C), transpose_b=True)
    cs_r, cs_c = ops.vec(cs_s, 0), ops.vec(cs_s, 1)
    sg_r, sg_c = ops.vec(sg_s, 0), ops.vec(sg_s, 1)
    ti, tj = ops.iota((C, C), 0), ops.iota((C, C), 1)
    # W[i, j] = exp(cs_i - cs_j) sc_j for an earlier token of the same segment, gm_i on i == j
    strict = (ti > tj) & (rows(sg_r) == cols(sg_c))
    expo = jnp.exp(jnp.where(strict, rows(cs_r) - cols(cs_c), -jnp.inf))
    w = expo * cols(ops.vec(sc_s, 1)) + jnp.where(ti == tj, rows(ops.vec(gm_s, 0)), 0.0)
    p = (s * w).astype(q_s.dtype)
    e = jnp.where(sg_r == 0, jnp.exp(cs_r), 0.0)  # decay from the state entering the chunk
    y = ops.matmul(q_s, st_s, (C, P), transpose_b=True)
    y = y * jax.lax.broadcast_in_dim(e, (C, P), [0])
    y = y + ops.matmul(p, v_s, (C, P))
    if gate:  # (y rounded to the input dtype, as the unfused path stores it, + D v) silu(z)
        d = jax.lax.broadcast_in_dim(ops.vec(d_s, 1), (C, P), [1])
        u = y.astype(y_s.dtype).astype(f32) + d * v_s[...].astype(f32)
        zf = z_s[...].astype(f32)
        y = u * zf / (1.0 + jnp.exp(-zf))
    y_s[...] = y.astype(y_s.dtype)


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
        for i, (src, dst) in enumerate(copies):
            plgpu.copy_gmem_to_smem(src, dst, bar.at[i])
        for i in range(len(copies)):
            plgpu.barrier_wait(bar.at[i])
        _body(_Ops(interpret), gate, q_s, k_s, v_s, st_s, cs_s, sc_s, gm_s, sg_s, z_s, d_s, y_s)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_s, y_g.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    tile = lambda *shape: plgpu.SMEM(shape, dt, transforms=_swizzled(dt))  # noqa: E731
    scratch = [tile(C, N), tile(C, N), tile(C, P), tile(P, N), tile(C, P),  # q k v S y
               plgpu.SMEM((C,), f32), plgpu.SMEM((C,), f32), plgpu.SMEM((C,), f32),  # cs sc gm
               plgpu.SMEM((C,), jnp.int32), tile(C, P), plgpu.SMEM((P,), f32),  # seg z D
               plgpu.Barrier(num_barriers=10)]
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        mode = InterpretGPUParams()
    else:
        mode = None
    args = (q, k, v, cs, sc, gm, seg.astype(jnp.int32), states)
    args += (z, D.astype(f32)) if gate else ()
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((B, L, H, P), dt),
        scratch_types=scratch,
        grid=(B, H, nc),
        grid_names=("b", "h", "c"),
        # Lane semantics (jax 0.10's default; 0.11 defaults to Warpgroup, whose layout inference
        # found no solution for this kernel on the H200): the layouts are the ones given here
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=mode,
    )(*args)
