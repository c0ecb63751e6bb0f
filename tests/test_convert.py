"""`mimo_channel_permutation`: maps the reference MIMO kernels' rotary pairs (i, i + N/2) onto ours.

The reference MIMO (TileLang) kernels rotate channel pairs (i, i + N/2) for i < S; we rotate
adjacent pairs (2i, 2i + 1). With ours[..., n] = reference[..., perm[n]], rotating the permuted
vector our way must equal rotating the reference vector the half-split way, then permuting.
"""

import numpy as np
import pytest

from mamba3_jax.convert import mimo_channel_permutation
from mamba3_jax.ops.rotary import rotate

SIZES = [8, 16, 64, 128]


def num_angles(d_state: int, rope_fraction: float) -> int:
    return int(d_state * rope_fraction) // 2  # as ModelConfig.num_rope_angles


def rotate_half_split(u: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The reference MIMO convention: pair (i, i + N/2) for i < S rotates by theta[..., i];
    (a, b) -> (a cos - b sin, a sin + b cos); every other channel passes through."""
    n, s = u.shape[-1], theta.shape[-1]
    half = n // 2
    out = u.copy()
    a, b = u[..., :s], u[..., half:half + s]
    c, sn = np.cos(theta), np.sin(theta)
    out[..., :s] = a * c - b * sn
    out[..., half:half + s] = a * sn + b * c
    return out


@pytest.mark.parametrize("rope_fraction", [0.5, 1.0])
@pytest.mark.parametrize("d_state", SIZES)
def test_is_a_permutation(d_state, rope_fraction):
    perm = mimo_channel_permutation(d_state, num_angles(d_state, rope_fraction))
    assert perm.shape == (d_state,)
    assert np.issubdtype(perm.dtype, np.integer)
    np.testing.assert_array_equal(np.sort(perm), np.arange(d_state))


@pytest.mark.parametrize("rope_fraction", [0.5, 1.0])
@pytest.mark.parametrize("d_state", SIZES)
def test_layout_documented_in_weights_md(d_state, rope_fraction):
    """perm[2i] = i, perm[2i+1] = i + N/2 for i < S; the unrotated channels follow, in order."""
    s = num_angles(d_state, rope_fraction)
    half = d_state // 2
    perm = mimo_channel_permutation(d_state, s)
    np.testing.assert_array_equal(perm[0:2 * s:2], np.arange(s))
    np.testing.assert_array_equal(perm[1:2 * s:2], half + np.arange(s))
    rest = [n for n in range(d_state) if not (n < s or half <= n < half + s)]
    np.testing.assert_array_equal(perm[2 * s:], rest)


def test_no_rotation_is_identity():
    np.testing.assert_array_equal(mimo_channel_permutation(16, 0), np.arange(16))


@pytest.mark.parametrize("rope_fraction", [0.5, 1.0])
@pytest.mark.parametrize("d_state", SIZES)
def test_rotations_commute_with_permutation(d_state, rope_fraction):
    rng = np.random.default_rng(d_state + int(10 * rope_fraction))
    s = num_angles(d_state, rope_fraction)
    perm = mimo_channel_permutation(d_state, s)
    u_ref = rng.standard_normal((3, 5, d_state)).astype(np.float32)  # reference layout
    theta = rng.uniform(-4 * np.pi, 4 * np.pi, (3, 5, s)).astype(np.float32)

    ours = np.asarray(rotate(u_ref[..., perm], theta))  # permute, then rotate adjacent pairs
    expected = rotate_half_split(u_ref.astype(np.float64), theta.astype(np.float64))[..., perm]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope_fraction", [0.5, 1.0])
def test_inner_products_survive_conversion(rope_fraction):
    """What the SSM sees, q_t . k_s with each rotated by its own cumulative angle, is the same
    in both layouts, so converted weights give the same outputs."""
    rng = np.random.default_rng(7)
    d_state = 32
    s = num_angles(d_state, rope_fraction)
    perm = mimo_channel_permutation(d_state, s)
    q, k = rng.standard_normal((2, 6, d_state))
    tq, tk = rng.uniform(0, 2 * np.pi, (2, 6, s))
    ref_dots = rotate_half_split(q, tq) @ rotate_half_split(k, tk).T
    our_dots = (np.asarray(rotate(q[:, perm].astype(np.float32), tq.astype(np.float32)), np.float64)
                @ np.asarray(rotate(k[:, perm].astype(np.float32), tk.astype(np.float32)),
                             np.float64).T)
    np.testing.assert_allclose(our_dots, ref_dots, rtol=1e-5, atol=1e-4)


def test_adjacent_and_half_split_differ_without_permutation():
    """Guard against a vacuous test: the two conventions really are different."""
    rng = np.random.default_rng(3)
    u = rng.standard_normal((4, 16)).astype(np.float32)
    theta = rng.uniform(0.5, 2.5, (4, 4)).astype(np.float32)
    assert not np.allclose(np.asarray(rotate(u, theta)), rotate_half_split(u, theta), atol=1e-2)
