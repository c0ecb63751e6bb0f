"""Every parallel SSM form equals the sequential reference: forward, gradients, state hand-over."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba3_jax.ops import ssm as ssm_ops
from mamba3_jax.ops.ssm import SSMInputs, SSMState, per_head, ssm_step
from tests.helpers import TIME_FIELDS, random_problem, rel_err, time_slice, tree_rel_err

# jitted: one compilation per test instead of op-by-op dispatch (about twice as fast on CPU)
ssm = jax.jit(ssm_ops.ssm, static_argnames=("form", "chunk_size"))
ssm_reference = jax.jit(ssm_ops.ssm_reference)

F32_TOL = 1e-5
BF16_TOL = 3e-2  # bf16 inputs, f32 state and accumulation, compared with an f32 reference
FORMS = ["associative", "chunked"]


def _f32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, tree)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("L,chunk,reset_prob", [(37, 8, 0.15), (16, 16, 0.0), (5, 8, 0.2)])
def test_forward_matches_reference_f32(form, R, L, chunk, reset_prob):
    inp, st, mx = random_problem(L * 10 + R, L=L, R=R, reset_prob=reset_prob)
    y_ref, f_ref = ssm_reference(inp, st, mx)
    y, f = ssm(inp, st, mx, form=form, chunk_size=chunk)
    assert rel_err(y, y_ref) < F32_TOL
    assert tree_rel_err(f, f_ref) < F32_TOL


@pytest.mark.parametrize("form", ["reference"] + FORMS)
def test_zero_initial_state_equals_no_history(form):
    """With a zero state, prepending tokens that are then reset away changes nothing."""
    inp, st, mx = random_problem(3, L=20, R=2, init_state=False)
    y, _ = ssm(inp, st, mx, form=form, chunk_size=8)
    # prepend 5 junk tokens and start a new segment at the original first token
    junk, _, _ = random_problem(4, L=5, R=2, init_state=False)
    cat = SSMInputs(**{f: jnp.concatenate([getattr(junk, f), getattr(inp, f)], axis=1)
                       for f in TIME_FIELDS[:-1]},
                    reset=jnp.zeros((2, 25), bool).at[:, 5].set(True))
    y2, _ = ssm(cat, st, mx, form=form, chunk_size=8)
    assert rel_err(y2[:, 5:], y) < F32_TOL


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("R", [1, 2])
def test_gradients_match_reference_f32(form, R):
    inp, st, mx = random_problem(11 + R, L=21, R=R, reset_prob=0.1)
    cot = jax.random.normal(jax.random.PRNGKey(99), (2, 21, R, 3, 4))

    def loss(fn, inp, st, mx):
        y, f = fn(inp, st, mx)
        return jnp.sum(y * cot) + jnp.sum(f.h * 0.3) + jnp.sum(f.angle)

    diff_inp = inp._replace(reset=None)

    def wrap(fn):
        return lambda i, s, m: loss(fn, i._replace(reset=inp.reset), s, m)

    g_ref = jax.grad(wrap(ssm_reference), argnums=(0, 1, 2))(diff_inp, st, mx)
    g = jax.grad(wrap(lambda i, s, m: ssm(i, s, m, form=form, chunk_size=8)),
                 argnums=(0, 1, 2))(diff_inp, st, mx)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, b) < 2 * F32_TOL


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("R", [1, 2])
def test_bf16_inputs_close_to_f32_reference(form, R):
    inp, st, mx = random_problem(21, L=40, R=R, dtype=jnp.bfloat16, reset_prob=0.05)
    y_ref, f_ref = ssm_reference(_f32(inp), _f32(st), mx)
    y, f = ssm(inp, st, mx, form=form, chunk_size=16)
    assert y.dtype == jnp.float32 and f.h.dtype == jnp.float32
    assert rel_err(y, y_ref) < BF16_TOL
    assert rel_err(f.h, f_ref.h) < BF16_TOL

    # gradients flow in bf16 too and stay close to the f32 ones
    def loss(fn, i):
        return jnp.sum(fn(i)[0] ** 2)
    g = jax.grad(lambda i: loss(lambda j: ssm(j, st, mx, form=form, chunk_size=16), i))(
        inp._replace(reset=None))
    g_ref = jax.grad(lambda i: loss(lambda j: ssm_reference(j, _f32(st), mx), i))(
        _f32(inp)._replace(reset=None))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, b) < 5 * BF16_TOL


@pytest.mark.parametrize("form", ["reference"] + FORMS)
@pytest.mark.parametrize("split", [1, 13])
def test_state_handover_split_equals_whole(form, split):
    inp, st, mx = random_problem(5, L=29, R=2, reset_prob=0.1)
    y, f = ssm(inp, st, mx, form=form, chunk_size=8)
    first, second = time_slice(inp, 0, split), time_slice(inp, split)
    y1, f1 = ssm(first, st, mx, form=form, chunk_size=8)
    y2, f2 = ssm(second, f1, mx, form=form, chunk_size=8)
    assert rel_err(jnp.concatenate([y1, y2], axis=1), y) < F32_TOL
    assert tree_rel_err(f2, f) < F32_TOL


@pytest.mark.parametrize("form", ["reference"] + FORMS)
def test_mimo_rank_one_equals_siso(form):
    inp, st, _ = random_problem(8, L=19, R=1)
    y_siso, f_siso = ssm(inp, st, None, form=form, chunk_size=8)
    ones = jnp.ones((3, 1, 4))
    y_mimo, f_mimo = ssm(inp, st, ones, form=form, chunk_size=8)
    assert rel_err(y_mimo, y_siso) < 1e-6
    assert tree_rel_err(f_mimo, f_siso) < 1e-6


def _plain_euler_ssm(x, Bm, Cm, log_decay, dt):
    """Mamba-2's exponential-Euler SSM, written independently: h = e^{A dt} h + dt x B^T."""
    def body(h, t_in):
        xt, bt, ct, ld, d = t_in
        h = jnp.exp(ld)[..., None, None] * h + (d[..., None] * xt)[..., None] * bt[..., None, :]
        return h, jnp.einsum("bhpn,bhn->bhp", h, ct, precision="highest")
    Bsz, L, H, P = x.shape
    h0 = jnp.zeros((Bsz, H, P, Bm.shape[-1]))
    xs = [jnp.swapaxes(a, 0, 1) for a in (x, Bm, Cm, log_decay, dt)]
    _, ys = jax.lax.scan(body, h0, xs)
    return jnp.swapaxes(ys, 0, 1)


@pytest.mark.parametrize("form", ["reference"] + FORMS)
def test_lambda_one_no_rotation_is_exponential_euler(form):
    inp, _, _ = random_problem(9, L=23, R=1, S=0, init_state=False)
    dt = inp.gamma / jax.nn.sigmoid(jnp.zeros(()))  # any positive dt
    inp = inp._replace(gamma=dt, eta=jnp.zeros_like(dt))  # lambda = 1
    st = SSMState.zeros(2, 3, 4, 8, 0, 1)
    y, _ = ssm(inp, st, None, form=form, chunk_size=8)
    y_plain = _plain_euler_ssm(inp.x, inp.k[:, :, 0], inp.q[:, :, 0], inp.log_decay, dt)
    assert rel_err(y[:, :, 0], y_plain) < F32_TOL


def test_step_equals_one_token_forward():
    inp, st, mx = random_problem(10, L=1, R=2, reset_prob=0.0)
    y_ref, f_ref = ssm(inp, st, mx, form="chunked", chunk_size=8)
    y, f = ssm_step(st, *(getattr(inp, f)[:, 0] for f in TIME_FIELDS[:-1]), None, mx)
    assert rel_err(y, y_ref[:, 0]) < F32_TOL
    assert tree_rel_err(f, f_ref) < F32_TOL


def test_unknown_form_is_rejected():
    inp, st, mx = random_problem(1, L=4)
    with pytest.raises(ValueError, match="unknown SSM form"):
        ssm(inp, st, mx, form="fast")


def test_reset_at_first_token_drops_initial_state():
    inp, st, mx = random_problem(12, L=9, R=1)
    inp = inp._replace(reset=jnp.zeros((2, 9), bool).at[:, 0].set(True))
    zero = SSMState(*(jnp.zeros_like(a) for a in st))
    for form in ["reference"] + FORMS:
        y, _ = ssm(inp, st, mx, form=form, chunk_size=4)
        y0, _ = ssm(inp._replace(reset=None), zero, mx, form=form, chunk_size=4)
        assert rel_err(y, y0) < F32_TOL, form
    assert np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize("form", ["reference"] + FORMS)
def test_group_level_inputs_with_bias_equal_per_head(form):
    """q/k given per B/C group plus per-head biases == the same expanded to heads by hand."""
    inp, st, mx = random_problem(13, L=17, R=2, H=4, reset_prob=0.1)
    ks = jax.random.split(jax.random.PRNGKey(14), 2)
    grouped = inp._replace(q=inp.q[:, :, :, :2], k=inp.k[:, :, :, :2],  # G = 2 groups, H = 4
                           q_bias=jax.random.normal(ks[0], (4, 2, 8)),
                           k_bias=jax.random.normal(ks[1], (4, 2, 8)))
    by_hand = inp._replace(
        q=jnp.repeat(grouped.q, 2, axis=3) + jnp.swapaxes(grouped.q_bias, 0, 1),
        k=jnp.repeat(grouped.k, 2, axis=3) + jnp.swapaxes(grouped.k_bias, 0, 1))
    assert rel_err(per_head(grouped).q, by_hand.q) == 0.0
    y_ref, f_ref = ssm_reference(by_hand, st, mx)
    y, f = ssm(grouped, st, mx, form=form, chunk_size=8)
    assert rel_err(y, y_ref) < F32_TOL
    assert tree_rel_err(f, f_ref) < F32_TOL
