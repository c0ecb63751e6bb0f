"""Shared pieces of the Mosaic TPU kernels: API shims, in-kernel helpers, the row layout.

Row layout. Every kernel works on "rows": row i of a chunk is (token t, rank r) with
i = t * R + r, so a chunk of C tokens is a (C*R, ...) tile and the rank-R (MIMO) update is one
matmul. Per-token scalars travel packed as an (8, C*R) float32 tile per chunk (one scalar per
sublane row, rows on the lane axis), which keeps every block's last two dims either full-extent
or (8, 128)-aligned and costs no lane/sublane padding in HBM:

    sublane 0  log decay A*dt on the rank-0 row of each token, 0 on the other rows
    sublane 1  1.0 on the rank-0 row of a token that starts a segment, else 0
    sublane 2  scale_t = gamma_t + eta_{t+1} (the trapezoid folded into a per-key scale)
    sublane 3  gamma_t
    4 .. 7     zero

Putting the log decay and the reset flag only on rank-0 rows makes a plain row-level inclusive
prefix sum equal to the token-level one, so in-chunk cumulative sums are one (8, CR) x (CR, CR)
matmul with a triangular ones matrix (TPU Pallas has no cumsum lowering).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mamba3_jax.errors import Unsupported

f32 = jnp.float32

#: marker for a squeezed block dimension (`pl.squeezed` on new jax, `None` on old)
SQ = getattr(pl, "squeezed", None)

#: sublane rows of the packed per-row scalar tile
SCALAR_ROWS = 8
ROW_LD, ROW_RESET, ROW_SCALE, ROW_GAMMA = 0, 1, 2, 3

_HIGHEST = jax.lax.Precision.HIGHEST


class KernelUnsupported(Unsupported):
    """A shape/config the TPU kernels cannot run ('auto' then falls back to XLA)."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise KernelUnsupported(msg)


def compiler_params(semantics, vmem_limit_bytes=None):
    """Mosaic compiler parameters under whichever name this jax has."""
    cls = getattr(pltpu, "CompilerParams", None)
    if cls is None:  # pragma: no cover - jax < 0.6
        cls = pltpu.TPUCompilerParams
    kw = {}
    if vmem_limit_bytes is not None:
        kw["vmem_limit_bytes"] = int(vmem_limit_bytes)
    return cls(dimension_semantics=tuple(semantics), **kw)


def parallel_and_arbitrary():
    par = getattr(pltpu, "PARALLEL", "parallel")
    arb = getattr(pltpu, "ARBITRARY", "arbitrary")
    return par, arb


def vmem_scratch(shape, dtype=f32):
    return pltpu.VMEM(tuple(shape), dtype)


def precision_for(dtype):
    """f32 operands: HIGHEST (the MXU otherwise rounds f32 to bf16); bf16/f16: default."""
    return _HIGHEST if jnp.dtype(dtype) == jnp.dtype(f32) else None


# ----------------------------------------------------------------------------- in-kernel helpers


def mm(a, b, *, ta: bool = False, tb: bool = False, precision=None):
    """a @ b with optional transposes expressed as contraction dims (no explicit transpose op),
    accumulated in float32. ta: contract a's rows (a^T b); tb: contract b's columns (a b^T)."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def iota2(shape, dim):
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def col_from_row(row, eye):
    """(1, n) -> (n, 1) without a transpose: masked lane reduction with the identity mask."""
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def row_from_col(col, eye):
    """(n, 1) -> (1, n) without a transpose: masked sublane reduction with the identity mask."""
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def total(a):
    """Sum of a 2-D tile as a (1, 1) tile."""
    return jnp.sum(jnp.sum(a, axis=1, keepdims=True), axis=0, keepdims=True)


def pack_rows(rows: dict, width: int):
    """{sublane index: (1, width) row} -> (8, width) tile, zero elsewhere (selects, no concat)."""
    sub = iota2((SCALAR_ROWS, width), 0)
    out = jnp.zeros((SCALAR_ROWS, width), f32)
    for idx, row in rows.items():
        out = jnp.where(sub == idx, jnp.broadcast_to(row, (SCALAR_ROWS, width)), out)
    return out


class ChunkConsts:
    """Per-chunk masks and cumulative quantities shared by the forward and backward kernels.

    All float32. Suffix _r: (1, CR) row over keys s; _c: (CR, 1) column over queries t;
    _l: (1, 1) value at the chunk's last row. Token indices come from a float floor of the row
    iota (no vector integer division needed).
    """

    def __init__(self, sr, CR: int, R: int):
        row_i = iota2((CR, CR), 0)
        col_i = iota2((CR, CR), 1)
        self.eye = row_i == col_i
        upper = (row_i <= col_i).astype(f32)  # upper[j, s] = 1 if j <= s
        # inclusive prefix sums of every packed scalar row: (8, CR) @ (CR, CR) on the MXU
        cum = mm(sr, upper, precision=_HIGHEST)
        self.cs_r = cum[ROW_LD:ROW_LD + 1, :]
        self.seg_r = jnp.floor(cum[ROW_RESET:ROW_RESET + 1, :] + 0.5)
        self.sc_r = sr[ROW_SCALE:ROW_SCALE + 1, :]
        self.gm_r = sr[ROW_GAMMA:ROW_GAMMA + 1, :]
        self.cs_c = col_from_row(self.cs_r, self.eye)
        self.seg_c = col_from_row(self.seg_r, self.eye)
        self.sc_c = col_from_row(self.sc_r, self.eye)
        self.gm_c = col_from_row(self.gm_r, self.eye)
        # chunk totals (values at the last row): the whole-chunk sums of the raw rows
        self.cs_l = jnp.sum(sr[ROW_LD:ROW_LD + 1, :], axis=1, keepdims=True)
        self.seg_l = jnp.floor(jnp.sum(sr[ROW_RESET:ROW_RESET + 1, :], axis=1, keepdims=True)
                               + 0.5)
        inv_r = 1.0 / R
        tok_t = jnp.floor((row_i.astype(f32) + 0.5) * inv_r)
        tok_s = jnp.floor((col_i.astype(f32) + 0.5) * inv_r)
        strict = (tok_t > tok_s) & (self.seg_c == self.seg_r)
        # strict lower entries have cs_t - cs_s <= 0; the clamp only guards masked entries
        self.decay = jnp.where(strict, jnp.exp(jnp.minimum(self.cs_c - self.cs_r, 0.0)), 0.0)
        self.diag = (tok_t == tok_s).astype(f32)
        self.upper = upper
        # weights of the intra-chunk matrix, the state readout and the state update
        self.W = self.decay * self.sc_r + self.diag * self.gm_c
        self.a_c = jnp.where(self.seg_c == 0.0, jnp.exp(self.cs_c), 0.0)  # from chunk start
        same_last = self.seg_c == self.seg_l
        self.ew_c = jnp.where(same_last, jnp.exp(jnp.minimum(self.cs_l - self.cs_c, 0.0)), 0.0)
        self.w_c = self.ew_c * self.sc_c  # to chunk end, times the key scale
        self.dec_l = jnp.where(self.seg_l == 0.0, jnp.exp(self.cs_l), 0.0)  # whole chunk
