"""Decode-step Pallas kernel against `ssm_step` + `gate_output` (launch variants, group-level
q/k with biases, no rotation, resets), its Triton lowering, prefill -> decode hand-over,
`Mamba3.step` wired to the kernel, and the measured defaults (launch shape; kernel or XLA step
for `auto`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from kernel_cases import INTERPRET, TOL, make_problem, rel

from mamba3_jax.ops.mixer import gate_output
from mamba3_jax.ops.ssm import per_head, ssm_reference
from pallas_kernels import DecodeBlocks, KernelUnsupported, chunked_scan, decode_step
from pallas_kernels.decode_step.reference import reference_step
from pallas_kernels.decode_step.shapes import TEST_SHAPE

B, H, N, P, S = 3, 2, 64, 16, 16
STATE_TOL = {"float32": 1e-5, "bfloat16": 1e-2}


@jax.jit
def ref_step(state, q, k, x, inc, ld, gm, eta, reset, p):
    """The oracle (`decode_step.reference`): `ssm_step` then `gate_output`."""
    return reference_step(state, q, k, x, p["z"], inc, ld, gm, eta, reset, D=p["D"],
                          mimo_x=p.get("mimo_x"), mimo_z=p.get("mimo_z"), mimo_o=p.get("mimo_o"),
                          norm_weight=p.get("norm_weight"))


@jax.jit
def ker_step(state, q, k, x, inc, ld, gm, eta, reset, p):
    return decode_step(state, q, k, x, p["z"], inc, ld, gm, eta, reset, D=p["D"],
                       mimo_x=p.get("mimo_x"), mimo_z=p.get("mimo_z"), mimo_o=p.get("mimo_o"),
                       norm_weight=p.get("norm_weight"), interpret=INTERPRET)


def _token(inp, p, t):
    args = tuple(a[:, t] for a in (inp.q, inp.k, inp.x, inp.angle_inc, inp.log_decay,
                                   inp.gamma, inp.eta))
    reset = None if inp.reset is None else inp.reset[:, t]
    return args + (reset,), dict(p, z=p["z"][:, t])


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_decode_step(R, state_dtype):
    inp, state, p = make_problem(10, B, 1, R, H, N, P, S, jnp.float32,
                                 state_dtype=jnp.dtype(state_dtype), norm=(R == 2))
    inp = inp._replace(reset=jnp.array([[False], [True], [False]]))
    args, pt = _token(inp, p, 0)
    want, want_state = ref_step(state, *args, pt)
    got, got_state = ker_step(state, *args, pt)
    assert got.shape == want.shape == (B, H, P)
    assert rel(got, want) < TOL["float32"], rel(got, want)
    for name, a, b in zip(want_state._fields, got_state, want_state, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel(a, b) < STATE_TOL[state_dtype], (name, rel(a, b))


def _group_step(inp, state, p, blocks, interpret=INTERPRET):
    """One kernel step on group-level q, k (B, R, G, N) with per-head biases."""
    return decode_step(state, inp.q[:, 0], inp.k[:, 0], inp.x[:, 0], p["z"][:, 0],
                       inp.angle_inc[:, 0], inp.log_decay[:, 0], inp.gamma[:, 0], inp.eta[:, 0],
                       inp.reset[:, 0], D=p["D"], mimo_x=p.get("mimo_x"),
                       mimo_z=p.get("mimo_z"), mimo_o=p.get("mimo_o"),
                       norm_weight=p.get("norm_weight"), q_bias=inp.q_bias, k_bias=inp.k_bias,
                       blocks=blocks, interpret=interpret)


# (R, state dtype, DecodeBlocks, S): the bench's variants in miniature (P = 32: blocks of 8, 16)
VARIANTS = [(1, "float32", DecodeBlocks(), 8), (1, "bfloat16", DecodeBlocks(8, 2), 8),
            (4, "float32", DecodeBlocks(16, 4, evict_first=False), 8),
            (4, "bfloat16", DecodeBlocks(8, 1), 16), (2, "float32", DecodeBlocks(16, 2), 0),
            # the new angle and its cos / sin from XLA
            (1, "float32", DecodeBlocks(8, 2, xla_trig=True), 8),
            (4, "bfloat16", DecodeBlocks(16, 4, xla_trig=True), 16),
            (1, "bfloat16", DecodeBlocks(8, 2, xla_trig=True), 0),
            # in-kernel cos / sin by the MUFU approximations (exact sin / cos when interpreted)
            (1, "float32", DecodeBlocks(8, 2, fast_trig=True), 8),
            (4, "bfloat16", DecodeBlocks(16, 2, fast_trig=True), 16),
            # the in-place barrier before the store (the interpreter has no barrier: the GPU run
            # and the offline compile check, tests/kernels/test_compile_check.py, test it)
            (1, "bfloat16", DecodeBlocks(8, 2, late_barrier=True), 8),
            # q and k rotated and biased by XLA, the new k_prev XLA's
            (1, "bfloat16", DecodeBlocks(8, 2, xla_rot=True), 8),
            (4, "float32", DecodeBlocks(16, 4, xla_rot=True), 16),
            (2, "float32", DecodeBlocks(16, 2, xla_rot=True), 0)]


@pytest.mark.parametrize("R,state_dtype,blocks,S", VARIANTS)
def test_decode_variants(R, state_dtype, blocks, S):
    """Every launch shape == the XLA step, group-level q/k + biases, a reset, with and without
    rotation (S = 0), SISO and MIMO, float32 and bfloat16 state."""
    T = TEST_SHAPE
    inp, state, p = make_problem(12, T["B"], 1, R, T["H"], T["N"], T["P"], S, jnp.float32,
                                 groups=1, state_dtype=jnp.dtype(state_dtype))
    inp = inp._replace(reset=(jnp.arange(T["B"]) == 1)[:, None])  # a segment starts in row 1
    want, want_state = ref_step(state, *_token(per_head(inp), p, 0)[0], dict(p, z=p["z"][:, 0]))
    got, got_state = jax.jit(functools.partial(_group_step, blocks=blocks))(inp, state, p)
    assert rel(got, want) < TOL["float32"], rel(got, want)
    for name, a, b in zip(want_state._fields, got_state, want_state, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel(a, b) < STATE_TOL[state_dtype], (name, rel(a, b))


@pytest.mark.parametrize("R,S,blocks", [(4, 8, DecodeBlocks(16, 4, xla_trig=True, mma=True)),
                                         (2, 0, DecodeBlocks(32, 2, mma=True))])
def test_decode_mma(R, S, blocks):
    """`DecodeBlocks.mma` (MIMO, bfloat16 state: the rank-2R update and the R readouts as bf16
    tensor-core dots) == the XLA step within the rounding of its bf16 operands (the update's
    terms, q and the new state as stored), and so close to the FMA kernel."""
    T = TEST_SHAPE
    inp, state, p = make_problem(15, T["B"], 1, R, T["H"], T["N"], T["P"], S, jnp.float32,
                                 groups=1, state_dtype=jnp.bfloat16)
    inp = inp._replace(reset=(jnp.arange(T["B"]) == 1)[:, None])
    want, want_state = ref_step(state, *_token(per_head(inp), p, 0)[0], dict(p, z=p["z"][:, 0]))
    got, got_state = jax.jit(functools.partial(_group_step, blocks=blocks))(inp, state, p)
    fma, _ = jax.jit(functools.partial(_group_step, blocks=dataclasses.replace(
        blocks, mma=False)))(inp, state, p)
    # bf16 operands, ~2^-9 relative each: 1.0-1.1e-3 here, where the FMA kernel's float32
    # arithmetic is within 1e-7 of the XLA step (a dropped mimo_x scale reads 0.21)
    assert rel(got, want) < 5e-3 and rel(got, fma) < 5e-3, (rel(got, want), rel(got, fma))
    for name, a, b in zip(want_state._fields, got_state, want_state, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel(a, b) < STATE_TOL["bfloat16"], (name, rel(a, b))


def test_decode_mma_needs_mimo_and_a_bf16_state():
    inp, state, p = _shapes(16, 2, 1, 1, 2, 32, 32, 8, groups=1, resets=True,
                            state_dtype=jnp.bfloat16)
    with pytest.raises(KernelUnsupported, match="DecodeBlocks.mma needs MIMO"):
        jax.eval_shape(functools.partial(_group_step, blocks=DecodeBlocks(16, 2, mma=True)),
                       inp, state, p)


def _shapes(*args, **kw):
    """make_problem's shapes and dtypes only (nothing computed)."""
    return jax.eval_shape(lambda: make_problem(*args, **kw))


def test_decode_norm_needs_whole_rows():
    inp, state, p = _shapes(13, 2, 1, 1, 2, 32, 32, 8, norm=True, groups=1, resets=True)
    with pytest.raises(KernelUnsupported, match="block_p == P"):
        jax.eval_shape(functools.partial(_group_step, blocks=DecodeBlocks(block_p=16)),
                       inp, state, p)


@pytest.mark.parametrize("R,state_dtype,blocks,norm", [
    (1, "float32", DecodeBlocks(), True), (4, "bfloat16", DecodeBlocks(16, 2), False),
    (1, "bfloat16", DecodeBlocks(16, 2, xla_trig=True), False),
    (4, "bfloat16", DecodeBlocks(16, 4, xla_trig=True, mma=True), False)])
def test_decode_lowers_to_triton(R, state_dtype, blocks, norm):
    """The compiled (not interpreted) kernel lowers to Triton IR on any host, with h aliased
    and nothing else: a program shares k_prev, x_prev and the angle with the other programs of
    its head, so updating them in place would race (session 10: on the GPU a row-loop variant
    that did so read rows another warp had already written; interpret mode cannot show it)."""
    inp, state, p = _shapes(14, 2, 1, R, 2, 64, 32, 16, jnp.bfloat16, groups=1, resets=True,
                            norm=norm, state_dtype=jnp.dtype(state_dtype))
    fn = jax.jit(functools.partial(_group_step, blocks=blocks, interpret=False),
                 donate_argnums=1)
    text = fn.trace(inp, state, p).lower(lowering_platforms=("cuda",)).as_text()
    call = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert len(call) == 1 and call[0].count("output_operand_alias<") == 1


@pytest.mark.parametrize("R,dtype", [(1, "float32"), (2, "bfloat16")])
def test_prefill_then_decode(R, dtype):
    """Chunked-kernel prefill of T0 tokens, then decode-kernel steps == the reference over all."""
    L, T0 = 12, 7
    dtype = jnp.dtype(dtype)
    inp, state, p = make_problem(11, B, L, R, H, N, P, S, dtype, resets=True)
    y, _ = jax.jit(ssm_reference)(inp, state, p.get("mimo_x"))
    want = gate_output(y, inp.x, p["z"], p["D"], p.get("mimo_x"), p.get("mimo_z"), p.get("mimo_o"))

    pre = inp._replace(**{f: getattr(inp, f)[:, :T0] for f in
                          ("q", "k", "x", "angle_inc", "log_decay", "gamma", "eta", "reset")})
    prefill = jax.jit(functools.partial(chunked_scan, chunk_size=16 // R, interpret=INTERPRET))
    out0, st = prefill(pre, state, **dict(p, z=p["z"][:, :T0]))
    outs = [out0]
    for t in range(T0, L):
        args, pt = _token(inp, p, t)
        o, st = ker_step(st, *args, pt)
        outs.append(o[:, None])
    got = jnp.concatenate(outs, axis=1)
    assert rel(got, want) < TOL[dtype.name], rel(got, want)


def test_mamba3_step_uses_kernel():
    """Mamba3.step with scan_backend='pallas_interpret' (GPU: 'pallas') == the reference step."""
    from flax import nnx

    from mamba3_jax import backends
    from mamba3_jax.config import ModelConfig
    from mamba3_jax.layers import Mamba3

    backend = "pallas_interpret" if INTERPRET else "pallas"
    cfg = ModelConfig(d_model=32, n_layer=1, d_state=64, headdim=16, mimo_rank=2,
                      scan_backend=backend)
    assert backends.step_backend(backend).endswith("_step")
    model = Mamba3(cfg, rngs=nnx.Rngs(0))
    ref_model = Mamba3(dataclasses.replace(cfg, scan_backend="reference"), rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.PRNGKey(0), (2, 3, cfg.d_model))
    cache, ref_cache = model.init_cache(2), ref_model.init_cache(2)

    @nnx.jit
    def step(m, u, cache):
        return m.step(u, cache)

    for t in range(u.shape[1]):
        o, cache = step(model, u[:, t], cache)
        r, ref_cache = step(ref_model, u[:, t], ref_cache)
        assert rel(o, r) < 1e-5, (t, rel(o, r))
    assert rel(cache.ssm.h, ref_cache.ssm.h) < 1e-5


def test_default_blocks_follow_the_measurement():
    """With no `blocks`, decode_step launches the measured best per (state dtype, N, R); the
    XLA step is preferred exactly where it measured faster (nowhere since session 17)."""
    from pallas_kernels.decode_step.pallas_triton import (
        FALLBACK_BLOCKS,
        MEASURED,
        default_blocks,
        xla_step_faster,
    )

    for (dtype, n, r), (blocks, kernel_us, xla_us) in MEASURED.items():
        assert default_blocks(dtype, n, r, 64) == blocks
        assert xla_step_faster(dtype, n, r) == (xla_us < kernel_us)
    assert not {k for k in MEASURED if xla_step_faster(*k)}
    assert default_blocks(jnp.bfloat16, 128, 2, 64) == MEASURED[("bfloat16", 128, 4)][0]  # MIMO
    assert default_blocks("float32", 32, 1, 64) == FALLBACK_BLOCKS  # unmeasured N
    assert not xla_step_faster("float32", 32, 1) and not xla_step_faster("bfloat16", 32, 1)
    assert default_blocks("float32", 128, 1, 64, has_norm=True).block_p is None  # RMSNorm
    assert default_blocks("float32", 128, 1, 8).block_p is None  # never more rows than P


def test_launch_shape_from_a_string_and_the_environment(monkeypatch):
    """'bp:warps[:noevict][:xlatrig]' names a launch shape; $MAMBA3_DECODE_BLOCKS sets the default
    (the norm still gets whole rows); a bad string is one clear error."""
    from pallas_kernels.decode_step.pallas_triton import default_blocks, parse_blocks

    assert parse_blocks("16:2") == DecodeBlocks(16, 2)
    assert parse_blocks("32:4:xlatrig") == DecodeBlocks(32, 4, xla_trig=True)
    assert parse_blocks("P:4:noevict") == DecodeBlocks(None, 4, evict_first=False)
    assert parse_blocks("32:4:xlatrig:mma") == DecodeBlocks(32, 4, xla_trig=True, mma=True)
    assert parse_blocks("16:2:late") == DecodeBlocks(16, 2, late_barrier=True)
    assert parse_blocks("16:2:xlarot") == DecodeBlocks(16, 2, xla_rot=True)
    monkeypatch.setenv("MAMBA3_DECODE_BLOCKS", "32:4")
    assert default_blocks("bfloat16", 128, 1, 64) == DecodeBlocks(32, 4)
    monkeypatch.setenv("MAMBA3_DECODE_BLOCKS", "32:4:mma")  # tensor cores: MIMO bf16 only
    assert default_blocks("bfloat16", 128, 4, 64) == DecodeBlocks(32, 4, mma=True)
    assert default_blocks("bfloat16", 128, 1, 64) == DecodeBlocks(32, 4)
    assert default_blocks("float32", 128, 4, 64) == DecodeBlocks(32, 4)
    monkeypatch.setenv("MAMBA3_DECODE_BLOCKS", "32:4")
    assert default_blocks("bfloat16", 128, 1, 64, has_norm=True) == DecodeBlocks()
    for bad in ("16", "16:2:fast", "16:2:loop", "x:2"):
        with pytest.raises(ValueError, match="bad decode launch shape"):
            parse_blocks(bad)


@pytest.mark.parametrize("R,state_dtype,xla_faster", [
    (1, "float32", False), (1, "bfloat16", False), (2, "float32", False),
    (1, "float32", True)])  # a measurement in which the XLA step won (none since session 17)
def test_auto_step_follows_the_measurement(monkeypatch, R, state_dtype, xla_faster):
    """On a GPU, `auto` decodes with 'pallas_gpu_auto_step': the kernel wherever it measured
    faster than the XLA step (every measured case since session 17; run here interpreted), the
    XLA step where `MEASURED` says that won; a named Pallas backend always gets the kernel.
    Mamba3.step on it == the reference step."""
    from flax import nnx

    import pallas_kernels
    from mamba3_jax import backends
    from mamba3_jax.config import ModelConfig
    from mamba3_jax.layers import Mamba3
    from pallas_kernels.decode_step.pallas_triton import MEASURED

    kernel = not xla_faster
    if xla_faster:
        key = (state_dtype, 64, R)
        monkeypatch.setitem(MEASURED, key, (MEASURED[key][0], 100.0, 50.0))

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert backends.step_backend("auto") == "pallas_gpu_auto_step"
    assert backends.step_backend("pallas") == backends.step_backend("pallas_gpu") \
        == "pallas_gpu_step"
    calls = []

    def spy(*args, **kw):  # the compiled kernel needs a GPU: record the call, interpret it
        calls.append(kw["interpret"])
        return decode_step(*args, **dict(kw, interpret=True))

    monkeypatch.setattr(pallas_kernels, "on_gpu", lambda: True)
    monkeypatch.setattr(pallas_kernels, "decode_step", spy)
    cfg = ModelConfig(d_model=32, n_layer=1, d_state=64, headdim=16, mimo_rank=R,
                      state_dtype=state_dtype, scan_backend="auto")
    model = Mamba3(cfg, rngs=nnx.Rngs(0))
    ref_model = Mamba3(dataclasses.replace(cfg, scan_backend="reference"), rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.PRNGKey(0), (2, cfg.d_model))
    out, cache = model.step(u, model.init_cache(2))
    ref, ref_cache = ref_model.step(u, ref_model.init_cache(2))
    assert calls == ([False] if kernel else [])
    assert rel(out, ref) < 1e-5 and rel(cache.ssm.h, ref_cache.ssm.h) < STATE_TOL[state_dtype]
