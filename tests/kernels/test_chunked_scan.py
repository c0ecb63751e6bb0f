"""The chunk-parallel prefill kernels (`pallas_kernels.chunked_scan`: rotation, SSD core, custom
VJPs) against the sequential reference: forward, final state and every input's gradient."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import pytest
from kernel_cases import GRAD_TOL, INTERPRET, TOL, make_problem, random_like, rel

from mamba3_jax import backends
from mamba3_jax.ops.rotary import increments_from
from pallas_kernels import TritonBlocks, chunked_scan
from pallas_kernels.chunked_scan import reference as oracle
from pallas_kernels.chunked_scan.shapes import TEST_SHAPE

B, H, N, P, S = (TEST_SHAPE[k] for k in ("B", "H", "N", "P", "S"))
reference = jax.jit(oracle.reference)


@functools.partial(jax.jit, static_argnames=("chunk", "blocks", "rotary"))
def kernel(inp, state, chunk, blocks=None, rotary="kernel", **p):
    return chunked_scan(inp, state, chunk_size=chunk, interpret=INTERPRET, blocks=blocks,
                        rotary=rotary, **p)


def check_state(got, want, tol):
    for name, a, b in zip(want._fields, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.size:
            assert rel(a, b) < tol, (name, rel(a, b))


@pytest.mark.parametrize("R,dtype,resets,groups", [
    (1, "float32", True, None),
    (1, "bfloat16", False, 1),
    (2, "float32", False, 1),
    (2, "bfloat16", True, None),
])
def test_forward(R, dtype, resets, groups):
    L = 40  # not a multiple of the chunk: padded
    inp, state, p = make_problem(0, B, L, R, H, N, P, S, jnp.dtype(dtype), resets, groups=groups)
    want, want_state = reference(inp, state, **p)
    got, got_state = kernel(inp, state, 16 // R, **p)
    assert got.shape == want.shape and got.dtype == inp.x.dtype
    assert rel(got, want) < TOL[dtype], rel(got, want)
    check_state(got_state, want_state, TOL[dtype])
    if R > 1:  # the inference forward rotates in XLA; the rotation kernel's forward as well
        got_k, state_k = kernel(inp, state, 16 // R, TritonBlocks(mimo_xla_rotation=0), **p)
        assert rel(got_k, want) < TOL[dtype], rel(got_k, want)
        check_state(state_k, want_state, TOL[dtype])


def test_forward_p_blocks_norm_and_no_rotation_and_xla_rotary():
    # P split over the sequential passes' programs (bp < P); RMSNorm; S = 0 (no rotary);
    # the XLA rotation path (used where the rotation kernel's tiles do not fit) == the kernel's.
    inp, state, p = make_problem(1, B, 32, 1, H, N, 32, S, jnp.float32)
    want, _ = reference(inp, state, **p)
    got, _ = kernel(inp, state, 16, TritonBlocks(bp=16), **p)
    assert rel(got, want) < TOL["float32"]
    got_xla, _ = kernel(inp, state, 16, rotary="xla", **p)
    assert rel(got_xla, got) < 1e-6
    # the default inference forward (D and the gate in the output kernel) == the training
    # path's kernels
    got_rows, rows_state = kernel(inp, state, 16, TritonBlocks(inference_gate=0), **p)
    got, got_state = kernel(inp, state, 16, **p)
    assert rel(got, got_rows) < 1e-6
    check_state(got_state, rows_state, 1e-6)
    # ... also with resets, a padded length and P blocks in its state pass
    inp, state, p = make_problem(3, B, 40, 1, H, N, 32, S, jnp.float32, True)
    want, want_state = reference(inp, state, **p)
    got, got_state = kernel(inp, state, 16, TritonBlocks(bp=16), **p)
    assert rel(got, want) < TOL["float32"], rel(got, want)
    check_state(got_state, want_state, TOL["float32"])
    inp, state, p = make_problem(2, B, 24, 2, H, N, P, 0, jnp.float32, True, norm=True)
    want, want_state = reference(inp, state, **p)
    got, got_state = kernel(inp, state, 8, **p)
    assert rel(got, want) < TOL["float32"]
    check_state(got_state, want_state, TOL["float32"])


def vjp_all(fn, inp, state, p, ct):
    """Cotangent ct pulled back through fn(inp, state, **p) to every input."""
    names = sorted(p)

    def f(inp, state, *vals):
        return fn(inp, state, **dict(zip(names, vals, strict=True)))

    return jax.jit(lambda args, ct: jax.vjp(f, *args)[1](ct))(
        (inp, state, *[p[n] for n in names]), ct)


def cast_like(ct, fn, inp, state, p):
    """The cotangent ct in the dtypes of fn's outputs (the kernels return the input dtype)."""
    shapes = jax.eval_shape(lambda: fn(inp, state, **p))
    return jax.tree.map(lambda c, s: None if c is None else c.astype(s.dtype), ct, shapes,
                        is_leaf=lambda c: c is None)


def check_grads(got, want, tol):
    flat1 = jax.tree_util.tree_leaves_with_path(want)
    flat2 = jax.tree.leaves(got)
    assert len(flat1) == len(flat2)
    for (path, a), b in zip(flat1, flat2, strict=True):
        if a.dtype == jax.dtypes.float0 or a.size == 0:
            continue
        assert b.dtype == a.dtype, jax.tree_util.keystr(path)
        assert rel(b, a) < tol, (jax.tree_util.keystr(path), rel(b, a))


@pytest.mark.parametrize("R,dtype,resets,norm,groups,split", [
    (1, "float32", True, False, 1, 1),
    (2, "float32", True, True, None, 0),
    (1, "bfloat16", False, False, None, 0),
    (2, "bfloat16", True, False, 1, 1),
])
def test_gradients(R, dtype, resets, norm, groups, split):
    """Every input's gradient == the reference's (one or two per-chunk gradient kernels)."""
    inp, state, p = make_problem(3, B, 40, R, H, N, P, S, jnp.dtype(dtype), resets, norm=norm,
                                 groups=groups)
    ct = random_like(reference(inp, state, **p), 7)
    want = vjp_all(reference, inp, state, p, ct)
    fn = functools.partial(kernel, chunk=16 // R, blocks=TritonBlocks(split_grad=split))
    got = vjp_all(fn, inp, state, p, cast_like(ct, fn, inp, state, p))
    check_grads(got, want, GRAD_TOL[dtype])


@pytest.mark.parametrize("R", [1, 2])
def test_rotary_chunk(R):
    """The rotation kernels on their own, smaller chunks (TritonBlocks.rotary_chunk; their own
    carried angles and segment ids): forward, state and every gradient == the reference's,
    with resets inside and on the edges of rotation chunks."""
    inp, state, p = make_problem(5, B, 44, R, H, N, P, S, jnp.float32, True, groups=1)
    inp = inp._replace(reset=inp.reset.at[:, 8].set(True).at[:, 23].set(True))
    # compiled tiles: >= 16 rows
    blocks = TritonBlocks(rotary_chunk=8 if INTERPRET else 16)
    _matches_reference(functools.partial(kernel, chunk=32, blocks=blocks), inp, state, p, 10)


def _matches_reference(fn, inp, state, p, seed):
    """fn's output, final state and every input gradient == the reference's (float32)."""
    want, want_state = reference(inp, state, **p)
    got, got_state = fn(inp, state, **p)
    assert rel(got, want) < TOL["float32"], rel(got, want)
    check_state(got_state, want_state, TOL["float32"])
    ct = random_like((want, want_state), seed)
    check_grads(vjp_all(fn, inp, state, p, ct), vjp_all(reference, inp, state, p, ct),
                GRAD_TOL["float32"])


@pytest.mark.parametrize("R", [1, 2])
def test_fast_trig(R):
    """The rotation kernels with `TritonBlocks.fast_trig` (range reduction, then MUFU sin / cos
    on the GPU; the reduction with exact sin / cos when interpreted): forward, state and every
    gradient == the reference's, with resets and angles carried over many turns."""
    inp, state, p = make_problem(9, B, 44, R, H, N, P, S, jnp.float32, True, groups=1)
    inp = inp._replace(angle_inc=inp.angle_inc * 40.0)  # cumulative angles of many turns
    state = state._replace(angle=state.angle + 300.0)
    fn = functools.partial(kernel, chunk=32 // R, blocks=TritonBlocks(
        fast_trig=1, rotary_chunk=8 if INTERPRET else 16))
    _matches_reference(fn, inp, state, p, 12)


def test_sincos_range_reduction():
    """`_compat.sincos(fast=True)`: theta reduced to [-pi, pi] in two exact steps keeps cos and
    sin within float32 rounding of the exact values, for angles of thousands of turns."""
    import numpy as np

    from pallas_kernels._compat import reduce_angle, sincos

    theta = np.concatenate([np.linspace(-2e4, 2e4, 40001), np.pi * np.arange(-3000, 3001),
                            np.pi * np.arange(-3000, 3001) + 1e-3]).astype(np.float32)
    r = np.asarray(reduce_angle(jnp.asarray(theta)))
    # within [-pi, pi] up to the rounding of theta / 2 pi near a half turn (~1e-3 rad at 2e4);
    # the MUFU approximations are accurate well beyond that
    assert np.abs(r).max() <= np.pi + 1e-2
    exact = theta.astype(np.float64)
    # r is theta less a whole number of turns: to float32 rounding of theta (~1e-3 at 2e4)
    turns = (exact - r) / (2 * np.pi)
    assert np.abs(turns - np.round(turns)).max() * 2 * np.pi < 1e-5
    cos, sin = sincos(jnp.asarray(theta), fast=True, interpret=True)
    assert np.abs(np.asarray(cos) - np.cos(exact)).max() < 2e-6
    assert np.abs(np.asarray(sin) - np.sin(exact)).max() < 2e-6
    c0, s0 = sincos(jnp.asarray(theta))  # the accurate path: jnp's own
    assert np.array_equal(c0, jnp.cos(theta)) and np.array_equal(s0, jnp.sin(theta))


def _with_factors(inp, rate_heads, seed):
    """inp with random increment factors (rate (B, L, rate_heads, S), dt (B, L, H)); its
    angle_inc is then formed from them inside `_dense`, so gradients reach the factors."""
    B_, L = inp.x.shape[:2]
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    rate = jnp.pi * jnp.tanh(jax.random.normal(k1, (B_, L, rate_heads, S)))
    dt = jax.nn.softplus(jax.random.normal(k2, (B_, L, H)) - 1.0)
    return inp._replace(angle_rate=rate, angle_dt=dt)


def _dense(fn):
    """fn on inputs whose angle_inc is rate * dt (the factors' contract)."""
    def g(inp, state, **p):
        return fn(inp._replace(angle_inc=increments_from(inp.angle_rate, inp.angle_dt)),
                  state, **p)
    return g


@pytest.mark.parametrize("R,rate_heads", [(1, 1), (2, H)])
def test_factored_angles(R, rate_heads):
    """The rotation kernels on the increments' factors (TritonBlocks.factored_angles): forward,
    state and every gradient (rate and dt included) == the reference's on rate * dt, shared
    (the model's) and per-head rates, with resets, a padded length and rotation chunks."""
    inp, state, p = make_problem(7, B, 44, R, H, N, P, S, jnp.float32, True, groups=1)
    inp = _with_factors(inp, rate_heads, 8)
    fn = _dense(functools.partial(kernel, chunk=32 // R, blocks=TritonBlocks(
        factored_angles=2, rotary_chunk=8 if INTERPRET else 16)))
    ref = _dense(reference)
    want, want_state = ref(inp, state, **p)
    got, got_state = fn(inp, state, **p)
    assert rel(got, want) < TOL["float32"], rel(got, want)
    check_state(got_state, want_state, TOL["float32"])
    dense, _ = _dense(functools.partial(kernel, chunk=32 // R))(inp, state, **p)
    assert rel(got, dense) < 1e-5, rel(got, dense)
    ct = random_like((want, want_state), 11)
    got_g, want_g = vjp_all(fn, inp, state, p, ct), vjp_all(ref, inp, state, p, ct)
    check_grads(got_g, want_g, GRAD_TOL["float32"])
    assert rel(got_g[0].angle_rate, want_g[0].angle_rate) < GRAD_TOL["float32"]
    assert float(jnp.abs(want_g[0].angle_dt).max()) > 0  # the check above saw real gradients


def _from_pre(fn):
    """fn on inputs whose rate is pi tanh(angle_pre) and angle_inc rate * dt (the contract of
    `SSMInputs.angle_pre`): gradients reach angle_pre through whichever a backend reads."""
    def g(inp, state, **p):
        rate = math.pi * jnp.tanh(inp.angle_pre.astype(jnp.float32))
        return fn(inp._replace(angle_rate=rate, angle_inc=increments_from(rate, inp.angle_dt)),
                  state, **p)
    return g


def _kernel_bodies(fn, *args, name: str, grids: bool = False, nargs: bool = False) -> list:
    """The jaxpr text (with `grids` the grid, with `nargs` the number of operands) of every
    Pallas kernel called `name` that fn(*args) runs."""
    from jax._src import core as jcore

    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call" and name in str(eqn.params.get("name")):
                found.append(tuple(eqn.params["grid_mapping"].grid) if grids
                             else len(eqn.invars) if nargs else str(eqn.params["jaxpr"]))
            for v in eqn.params.values():
                if isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                    visit(getattr(v, "jaxpr", v))

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("rate_heads,pre_dtype", [(1, "float32"), (H, "float32"),
                                                  (H, "bfloat16")])
def test_pre_activation_angles(rate_heads, pre_dtype):
    """The rotation kernels on the rate's pre-activation (`SSMInputs.angle_pre`, pi tanh in
    registers; the official kernels' input): forward, state and every gradient (angle_pre and
    dt included) == the reference's on pi tanh(angle_pre) * dt, and == the kernels on the float32
    rate (`pre_angles=0`)."""
    inp, state, p = make_problem(8, B, 44, 1, H, N, P, S, jnp.float32, True, groups=1)
    inp = _with_factors(inp, rate_heads, 9)
    inp = inp._replace(angle_pre=(1.5 * inp.angle_rate).astype(pre_dtype))
    blocks = TritonBlocks(rotary_chunk=8 if INTERPRET else 16, pre_angles=1)
    fn = _from_pre(functools.partial(kernel, chunk=32, blocks=blocks))
    ref = _from_pre(reference)
    want, want_state = ref(inp, state, **p)
    got, got_state = fn(inp, state, **p)
    assert rel(got, want) < TOL["float32"], rel(got, want)
    check_state(got_state, want_state, TOL["float32"])
    off = _from_pre(functools.partial(kernel, chunk=32, blocks=dataclasses.replace(
        blocks, pre_angles=0)))
    assert rel(got, off(inp, state, **p)[0]) < 1e-5
    for f, tanh_inside in ((fn, True), (off, False)):  # which input the rotation kernel reads
        bodies = _kernel_bodies(lambda i, f=f: f(i, state, **p), inp, name="mamba3_rotate_qk")
        assert bodies and all(("tanh" in b) == tanh_inside for b in bodies)
    ct = random_like((want, want_state), 13)
    got_g, want_g = vjp_all(fn, inp, state, p, ct), vjp_all(ref, inp, state, p, ct)
    tol = GRAD_TOL["float32"] if pre_dtype == "float32" else 1e-2  # d angle_pre in bf16
    assert got_g[0].angle_pre.dtype == jnp.dtype(pre_dtype)
    assert rel(got_g[0].angle_pre, want_g[0].angle_pre) < tol
    assert float(jnp.abs(want_g[0].angle_pre.astype(jnp.float32)).max()) > 0
    check_grads(tuple(g._replace(angle_pre=None) if hasattr(g, "angle_pre") else g
                      for g in got_g),
                tuple(g._replace(angle_pre=None) if hasattr(g, "angle_pre") else g
                      for g in want_g), GRAD_TOL["float32"])


def test_factored_angles_bad_shapes():
    inp, state, p = make_problem(5, 1, 8, 1, H, N, P, S, jnp.float32)
    bad = _with_factors(inp, 1, 1)._replace(angle_dt=jnp.ones((1, 8, H + 1)))
    with pytest.raises(ValueError, match="angle_rate"):
        kernel(bad, state, 16, **p)


def test_gradients_p_blocks_resets_on_chunk_edges():
    """P blocks in the sequential passes, resets on a chunk's first and last token, a padded
    length, no rotation: gradients == the reference's."""
    inp, state, p = make_problem(6, B, 52, 1, H, N, 32, 0, jnp.float32, resets=True)
    inp = inp._replace(reset=inp.reset.at[:, 16].set(True).at[:, 31].set(True))
    ct = random_like(reference(inp, state, **p), 8)
    want = vjp_all(reference, inp, state, p, ct)
    got = vjp_all(functools.partial(kernel, chunk=16, blocks=TritonBlocks(bp=16)),
                  inp, state, p, ct)
    check_grads(got, want, GRAD_TOL["float32"])


def test_auto_p_blocks():
    """bp = 0 splits P into 16-row blocks only where B H leaves the sequential passes few
    programs (`auto_bp`); forward and gradients agree with the whole-P launch."""
    from pallas_kernels.chunked_scan.pallas_triton import SMALL_BH, auto_bp

    assert auto_bp(SMALL_BH - 1, 64) == 16 and auto_bp(SMALL_BH, 64) == 64
    assert auto_bp(1, 8) == 8
    inp, state, p = make_problem(4, B, 40, 1, H, N, 32, S, jnp.float32, True)
    assert B * H < SMALL_BH  # so the default launch here is bp = 16 < P
    got, got_state = kernel(inp, state, 16, **p)
    whole, whole_state = kernel(inp, state, 16, TritonBlocks(bp=32), **p)
    assert rel(got, whole) < 1e-6
    check_state(got_state, whole_state, 1e-6)
    ct = random_like((got, got_state), 5)
    g_auto = vjp_all(functools.partial(kernel, chunk=16), inp, state, p, ct)
    g_whole = vjp_all(functools.partial(kernel, chunk=16, blocks=TritonBlocks(bp=32)), inp,
                      state, p, ct)
    check_grads(g_auto, g_whole, 1e-5)


def test_pass_unroll():
    """`pass_unroll`: the sequential passes form several chunks' shares before stepping through
    them; 5 chunks in pairs (two groups and a tail), resets, a padded length, two P blocks:
    output, final state and every gradient equal the one-chunk-a-step passes'."""
    inp, state, p = make_problem(7, B, 72, 1, H, N, 32, S, jnp.float32, True)
    blocks = TritonBlocks(bp=16, pass_unroll=2)
    got, got_state = kernel(inp, state, 16, blocks, **p)
    want, want_state = kernel(inp, state, 16, TritonBlocks(bp=16), **p)
    assert rel(got, want) < 1e-6
    check_state(got_state, want_state, 1e-6)
    ct = random_like((got, got_state), 6)
    check_grads(vjp_all(functools.partial(kernel, chunk=16, blocks=blocks), inp, state, p, ct),
                vjp_all(functools.partial(kernel, chunk=16, blocks=TritonBlocks(bp=16)), inp,
                        state, p, ct), 1e-6)
    ref, _ = reference(inp, state, **p)
    assert rel(got, ref) < TOL["float32"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_core_gate(dtype):
    """`core_gate`: the core with its skip and gate under one VJP (D dy added to dv in the dk/dv
    kernel): the training path's output, final state and every gradient (z and D included)
    equal the core-then-XLA-gate path's, SISO with resets and a padded length; MIMO keeps the
    XLA gate."""
    inp, state, p = make_problem(10, B, 40, 1, H, N, P, S, jnp.dtype(dtype), True, groups=1)
    on = TritonBlocks(core_gate=1)
    train = functools.partial(kernel, chunk=16)
    ct = random_like(kernel(inp, state, 16, **p), 11)
    got_g = vjp_all(functools.partial(train, blocks=on), inp, state, p, ct)
    want_g = vjp_all(train, inp, state, p, ct)
    # float32: the same sums; bf16: d x is D dy + the kernel's dv in float32, rounded once
    # (the XLA path adds two bf16 gradients): 2.6e-3 apart there, every other gradient equal
    check_grads(got_g, want_g, 1e-6 if dtype == "float32" else 5e-3)
    ref_g = vjp_all(reference, inp, state, p, cast_like(ct, reference, inp, state, p))
    check_grads(got_g, ref_g, GRAD_TOL[dtype])

    def dkv_operands(blocks):  # the dk/dv kernel reads D (H, P) under core_gate
        return _kernel_bodies(lambda i: vjp_all(functools.partial(train, blocks=blocks), i,
                                                state, p, ct), inp,
                              name="mamba3_ssd_grad_dkv", nargs=True)

    assert dkv_operands(on) == [n + 1 for n in dkv_operands(TritonBlocks())] != []
    if dtype == "float32":  # MIMO: the option does not apply
        inp2, state2, p2 = make_problem(10, B, 40, 2, H, N, P, S, jnp.float32, True, groups=1)
        ct2 = random_like(kernel(inp2, state2, 8, **p2), 12)
        check_grads(vjp_all(functools.partial(kernel, chunk=8, blocks=on), inp2, state2, p2, ct2),
                    vjp_all(functools.partial(kernel, chunk=8), inp2, state2, p2, ct2), 1e-6)


def test_bad_options_rejected():
    inp, state, p = make_problem(5, 1, 8, 1, H, N, P, S, jnp.float32)
    with pytest.raises(ValueError, match="rotary"):
        kernel(inp, state, 16, rotary="fast", **p)
    with pytest.raises(backends.Unsupported, match="block bp"):
        kernel(inp, state, 16, TritonBlocks(bp=24), **p)
    with pytest.raises(backends.Unsupported, match="rotary_chunk 12"):
        kernel(inp, state, 16, TritonBlocks(rotary_chunk=12), **p)
    for bad in (TritonBlocks(pre_angles=2), TritonBlocks(pass_unroll=0)):
        with pytest.raises(ValueError, match="pre_angles must be 0 or 1"):
            kernel(inp, state, 16, bad, **p)


@pytest.mark.parametrize("R", [2])  # R = 1 hand-over: test_decode_kernel's prefill test
def test_state_handover(R):
    """Two calls with the state handed over == one call == the reference."""
    inp, state, p = make_problem(4, B, 48, R, H, N, P, S, jnp.float32, resets=True)
    whole, whole_state = kernel(inp, state, 16 // R, **p)
    cut = 21

    def part(a, sl):
        return None if a is None else a[:, sl]

    first = inp._replace(**{f: part(getattr(inp, f), slice(0, cut)) for f in
                            ("q", "k", "x", "angle_inc", "log_decay", "gamma", "eta", "reset")})
    second = inp._replace(**{f: part(getattr(inp, f), slice(cut, None)) for f in
                             ("q", "k", "x", "angle_inc", "log_decay", "gamma", "eta", "reset")})
    p1 = dict(p, z=p["z"][:, :cut])
    p2 = dict(p, z=p["z"][:, cut:])
    o1, mid = kernel(first, state, 16 // R, **p1)
    o2, end = kernel(second, mid, 16 // R, **p2)
    got = jnp.concatenate([o1, o2], axis=1)
    assert rel(got, whole) < TOL["float32"]
    check_state(end, whole_state, TOL["float32"])
    want, want_state = reference(inp, state, **p)
    assert rel(got, want) < TOL["float32"]


def test_registry_and_fallback():
    inp, state, p = make_problem(5, 1, 8, 1, H, N, P, S, jnp.float32)
    name = "pallas_gpu" if not INTERPRET else "pallas_gpu_interpret"
    assert backends.resolve("pallas_interpret") == ["pallas_gpu_interpret"]
    core = jax.jit(backends.mixer_core, static_argnames=("backend", "chunk_size"))
    out, _ = core(inp, state, backend=name, chunk_size=16, **p)
    want, _ = reference(inp, state, **p)
    assert rel(out, want) < TOL["float32"]
    # a shape the kernel cannot run: a forced kernel raises, 'auto' falls back
    inp, state, p = make_problem(5, 1, 8, 1, H, 48, P, 8, jnp.float32)
    with pytest.raises(backends.Unsupported):
        core(inp, state, backend=name, chunk_size=16, **p)
    out, _ = core(inp, state, backend="auto", chunk_size=16, **p)
    want, _ = reference(inp, state, **p)
    assert rel(out, want) < 1e-4


@pytest.mark.parametrize("blocks,rank", [("", 1), ("", 2), ("factored_angles=2", 2),
                                         ("factored_angles=0", 1)])
def test_mamba3_layer_gradients_match_chunked(blocks, rank, monkeypatch):
    """The Mamba3 layer on the kernel backend (group-level q/k + biases, resets, MIMO):
    loss and every parameter gradient equal those of the XLA chunked backend; also with the
    rotation kernels on the model's shared increment factors (by default SISO only; MIMO too
    with factored_angles=2) and on the (B, L, H, S) increments ($MAMBA3_TRITON_BLOCKS)."""
    import dataclasses

    monkeypatch.setenv("MAMBA3_TRITON_BLOCKS", blocks)

    from flax import nnx

    from mamba3_jax.config import ModelConfig
    from mamba3_jax.layers import Mamba3

    cfg = ModelConfig(d_model=32, n_layer=1, d_state=N, headdim=16, mimo_rank=rank,
                      scan_backend="pallas_interpret" if INTERPRET else "pallas")
    model = Mamba3(cfg, rngs=nnx.Rngs(0))
    ref = Mamba3(dataclasses.replace(cfg, scan_backend="chunked"), rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.PRNGKey(1), (2, 21, cfg.d_model))
    reset = jax.random.uniform(jax.random.PRNGKey(2), (2, 21)) < 0.1

    @nnx.jit
    def loss_grad(m, u, reset):
        def loss(m):
            out, cache = m(u, reset=reset)
            return jnp.sum(out ** 2) + jnp.sum(cache.ssm.h)
        return nnx.value_and_grad(loss)(m)

    l1, g1 = loss_grad(model, u, reset)
    l2, g2 = loss_grad(ref, u, reset)
    assert rel(l1, l2) < 1e-5
    flat1 = jax.tree_util.tree_leaves_with_path(nnx.state(g1))
    flat2 = jax.tree.leaves(nnx.state(g2))
    for (path, a), b in zip(flat1, flat2, strict=True):
        assert rel(a, b) < 5e-5, (jax.tree_util.keystr(path), rel(a, b))


def test_blocks_from_a_string_and_the_environment(monkeypatch):
    from pallas_kernels.chunked_scan.pallas_triton import default_blocks, parse_blocks

    assert parse_blocks("rotary_chunk=32; factored_angles=1;angle_mode=ieee") == TritonBlocks(
        rotary_chunk=32, factored_angles=1, angle_mode="ieee")
    assert parse_blocks("ours") == parse_blocks("") == TritonBlocks()
    for bad in ("rotary_chunks=32", "rotary_chunk"):
        with pytest.raises(ValueError, match="bad TritonBlocks option"):
            parse_blocks(bad)
    monkeypatch.setenv("MAMBA3_TRITON_BLOCKS", "factored_angles=0")
    assert default_blocks() == TritonBlocks(factored_angles=0) != TritonBlocks()
