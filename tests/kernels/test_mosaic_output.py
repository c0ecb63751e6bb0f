"""The chunk output kernel in Pallas Mosaic GPU (`chunked_scan.pallas_mosaic_gpu`,
`TritonBlocks.mosaic_output`): the same outputs as the Triton output kernel and the reference,
gated (inference) and not (training), with resets and padding; and it lowers for CUDA on any
host. Off the GPU it runs in jax's Mosaic GPU interpreter, whose products are plain dots (the
module's docstring says what the interpreter cannot check)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import pytest
from kernel_cases import INTERPRET, TOL, make_problem, random_like, rel

from mamba3_jax.ops.rotary import increments_from
from pallas_kernels import TritonBlocks, chunked_scan
from pallas_kernels._compat import KernelUnsupported
from pallas_kernels.chunked_scan import pallas_mosaic_gpu
from pallas_kernels.chunked_scan import reference as oracle

pytest.importorskip("jax.experimental.pallas.mosaic_gpu")

# the kernel's tile: 64-token chunks, N and P multiples of 64 (one group, per-head biases)
B, H, N, P, S, C = 1, 2, 64, 64, 16, 64


@functools.partial(jax.jit, static_argnames=("blocks",))
def scan(inp, state, blocks, **p):
    return chunked_scan(inp, state, chunk_size=C, interpret=INTERPRET, blocks=blocks, **p)


MOSAIC, TRITON = TritonBlocks(mosaic_output=1), TritonBlocks(mosaic_output=0)
ROTATING = TritonBlocks(mosaic_output=2)


def _problem(seed, L=100, resets=True):  # two chunks, the second padded
    return make_problem(seed, B, L, 1, H, N, P, S, jnp.bfloat16, resets, groups=1)


def test_inference_forward_matches_triton_and_reference():
    """Outside autodiff the output kernel applies D and the gate (SISO)."""
    inp, state, p = _problem(0)
    want, want_state = oracle.reference(inp, state, **p)
    got, got_state = scan(inp, state, MOSAIC, **p)
    tri, _ = scan(inp, state, TRITON, **p)
    assert got.dtype == inp.x.dtype and got.shape == want.shape
    assert rel(got, tri) < 1e-2, rel(got, tri)  # bf16 output: rounding apart at most
    assert rel(got, want) < TOL["bfloat16"], rel(got, want)
    for a, b in zip(got_state, want_state, strict=True):
        if a.size:
            assert rel(a, b) < TOL["bfloat16"]


def test_training_forward_and_gradients_match_triton():
    """Under autodiff the output kernel returns y (no gate); the backward is the Triton one."""
    inp, state, p = _problem(1)

    def loss(blocks, x, ct):
        out, _ = scan(inp._replace(x=x), state, blocks, **p)
        return jnp.sum(out.astype(jnp.float32) * ct)

    ct = random_like(scan(inp, state, TRITON, **p)[0], 2).astype(jnp.float32)
    (got, dgot), (want, dwant) = (jax.value_and_grad(loss, argnums=1)(b, inp.x, ct)
                                  for b in (MOSAIC, TRITON))
    assert abs(float(got - want)) <= 1e-2 * abs(float(want)) + 1e-3, (got, want)
    assert rel(dgot, dwant) < 1e-6


def test_kernel_alone_against_plain_maths():
    """`output` alone, gated, on random rows, weights and states (every token's segment id
    and decay of its own)."""
    L, nc = 128, 2
    ks = jax.random.split(jax.random.PRNGKey(3), 9)
    bf = jnp.bfloat16
    q, k = (jax.random.normal(ks[i], (B, L, H, N)).astype(bf) / 4 for i in (0, 1))
    v, z = (jax.random.normal(ks[i], (B, L, H, P)).astype(bf) for i in (2, 3))
    cs = -jnp.cumsum(jax.random.uniform(ks[4], (B, H, nc, C)) * 0.2, -1).reshape(B, H, L)
    sc, gm = (jax.random.uniform(ks[i], (B, H, L)) for i in (5, 6))
    seg = jnp.zeros((B, L), jnp.int32).at[:, 20:C].set(1).at[:, C + 40:].set(1)
    st = jax.random.normal(ks[7], (B, H, nc, P, N)).astype(bf)
    D = jax.random.normal(ks[8], (H, P))
    got = pallas_mosaic_gpu.output(q, k, v, cs, sc, gm, seg, st, z, D, interpret=INTERPRET)

    f = jnp.float32
    r = lambda u: u.astype(f).reshape(B, nc, C, H, -1)  # noqa: E731
    t = jnp.arange(C)
    cs4, sg = cs.reshape(B, H, nc, C), seg.reshape(B, nc, C)
    strict = (t[:, None] > t[None, :]) & (sg[:, None, :, :, None] == sg[:, None, :, None, :])
    expo = jnp.exp(jnp.where(strict, cs4[..., :, None] - cs4[..., None, :], -jnp.inf))
    w = expo * sc.reshape(B, H, nc, 1, C) + jnp.where(
        t[:, None] == t[None, :], gm.reshape(B, H, nc, C, 1), 0.0)
    s = jnp.einsum("bcihn,bcjhn->bhcij", r(q), r(k))
    y = jnp.einsum("bhcij,bcjhp->bcihp", (s * w).astype(bf).astype(f), r(v))
    e = jnp.where(sg[:, None] == 0, jnp.exp(cs4), 0.0)
    y = y + jnp.einsum("bcihn,bhcpn->bcihp", r(q), st.astype(f)) * jnp.moveaxis(e, 1, 3)[..., None]
    u = y.astype(bf).astype(f) + D[None, None, None] * r(v)
    want = (u * jax.nn.sigmoid(r(z)) * r(z)).reshape(B, L, H, P)
    assert got.shape == want.shape and got.dtype == bf
    assert rel(got, want) < 1e-2, rel(got, want)


def test_unsupported_shapes_fall_back():
    for args in ((32, 1, 64, 64, jnp.bfloat16), (64, 2, 64, 64, jnp.bfloat16),
                 (64, 1, 32, 64, jnp.bfloat16), (64, 1, 64, 64, jnp.float32)):
        with pytest.raises(KernelUnsupported):
            pallas_mosaic_gpu.check_supported(*args)
    # the forward keeps the Triton kernel where the Mosaic one does not apply (float32 here)
    inp, state, p = make_problem(4, B, 64, 1, H, N, P, S, jnp.float32, False, groups=1)
    got, _ = scan(inp, state, MOSAIC, **p)
    assert rel(got, scan(inp, state, TRITON, **p)[0]) < 1e-6


def test_lowers_for_cuda_on_any_host():
    """The benchmark's inference forward (B8 L2048 H32 shape, bf16) with the Mosaic output
    kernel lowers for CUDA here: the WGMMA layouts, swizzles and TMA boxes are checked at
    lowering."""
    from pallas_kernels.chunked_scan import bench

    d = jax.eval_shape(lambda: bench.official_like_inputs(0, 8, 2048, 32))
    f = bench.layer_fn(functools.partial(chunked_scan, blocks=MOSAIC, chunk_size=64))
    text = jax.jit(f).trace(d).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "mamba3_ssd_output" not in text


@pytest.mark.parametrize("rate_heads,pre,resets,stages,mode,rotary_chunk", [
    (1, False, True, 2, 2, 16), (H, True, False, 2, 2, 16), (H, True, False, 1, 2, 16),
    (1, False, True, 2, 3, 16), (H, True, False, 2, 3, 16), (H, True, False, 2, 3, 0)])
def test_inference_forward_rotating_q_in_the_kernel(rate_heads, pre, resets, stages, mode,
                                                    rotary_chunk):
    """`mosaic_output=2`: no per-head rows; the two Mosaic kernels rotate the groups' q, k from
    the angles' factors (the model's shared rate, or the benchmark's per-head raw angles) with a
    carried angle of many turns; with resets, and without (the state carried over three
    chunks), the state pass prefetching the next chunk's tiles or not. `mosaic_output=3`: the
    Triton rotation of k alone (in its own 16-token chunks, or the core's: rotary_chunk 0)
    and the Triton state pass, then the same rotating output kernel. Output and final state
    == the Triton path and the reference."""
    # N = 128: S = 32 angles, the fewest whose float32 carry is one whole TMA copy (128 bytes)
    n, s = 128, 32
    inp, state, p = make_problem(5, B, 180, 1, H, n, P, s, jnp.bfloat16, resets, groups=1)
    k1, k2 = jax.random.split(jax.random.PRNGKey(6))
    raw = jax.random.normal(k1, (B, inp.x.shape[1], rate_heads, s))
    dt = jax.nn.softplus(jax.random.normal(k2, inp.x.shape[:3]) - 1.0)
    rate = math.pi * jnp.tanh(raw)
    inp = inp._replace(angle_rate=rate, angle_dt=dt, angle_inc=increments_from(rate, dt),
                       angle_pre=raw.astype(jnp.bfloat16) if pre else None)
    if pre:  # the contract of angle_pre: the rate is pi tanh of it as given
        rate = math.pi * jnp.tanh(inp.angle_pre.astype(jnp.float32))
        inp = inp._replace(angle_rate=rate, angle_inc=increments_from(rate, dt))
    state = state._replace(angle=state.angle + 200.0)
    # slow decay, so that the state entering a chunk and the state carried over it matter
    inp = inp._replace(log_decay=inp.log_decay * 0.01)
    blocks = TritonBlocks(mosaic_output=mode, mosaic_stages=stages, rotary_chunk=rotary_chunk)
    lowered = jax.jit(functools.partial(chunked_scan, chunk_size=C, blocks=blocks)).trace(
        inp, state, **p).lower(lowering_platforms=("cuda",)).as_text()
    assert "mamba3_ssd_output" not in lowered  # the route: the output kernel is Mosaic's
    if mode == 2:
        assert lowered.count("mosaic_gpu") >= 2 and "mamba3_rotate_qk" not in lowered
    else:
        assert "mamba3_rotate_k" in lowered and "mamba3_ssd_state" in lowered  # k rows alone
        assert "mamba3_rotate_qk" not in lowered
    want, want_state = oracle.reference(inp, state, **p)
    got, got_state = scan(inp, state, blocks, **p)
    tri, tri_state = scan(inp, state, TRITON, **p)
    assert got.dtype == inp.x.dtype and got.shape == want.shape
    assert rel(got, tri) < 1e-2, rel(got, tri)
    assert rel(got, want) < TOL["bfloat16"], rel(got, want)
    # the final state: the same maths as the Triton path, but its angle is a float32 sum of
    # ~200 radians over chunks of 64 tokens here and of 16 in the rotation kernel's path (a few
    # float32 ulps apart: 3e-6), so a few bf16-rounded k entries land an ulp apart and h moves
    # by ~5e-5 over three chunks (on the GPU the prefix sums, 3 bf16 wgmma against 3xTF32, and
    # the summation orders differ as well); a 1% error in one chunk's decay is 1e-2
    for name, a, b in zip(got_state._fields, got_state, tri_state, strict=True):
        assert rel(a, b) < (1e-5 if name == "angle" else 1e-3), (name, rel(a, b))


def test_rotating_path_has_no_rows():
    """With `mosaic_output=2` the inference forward is two Mosaic GPU kernels: no rotation
    kernel (no per-head q, k rows) and no Triton state or output kernel, lowered for CUDA here
    at the benchmark's shape (per-head raw angles, as the official layer)."""
    from pallas_kernels.chunked_scan import bench

    d = jax.eval_shape(lambda: bench.official_like_inputs(0, 8, 2048, 32))
    f = bench.layer_fn(functools.partial(chunked_scan, blocks=ROTATING, chunk_size=64))
    text = jax.jit(f).trace(d).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2
    for name in ("mamba3_rotate_qk", "mamba3_ssd_state", "mamba3_ssd_output"):
        assert name not in text, name
