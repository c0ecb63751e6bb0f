"""ModelConfig.rotation_dt: the data-dependent angle per step is pi tanh(angles) dt (paper,
default) or pi tanh(angles) for every head (rotation_dt=False, the state-tracking option)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba3_jax.config import ModelConfig
from mamba3_jax.model import Mamba3LM
from mamba3_jax.ops.mixer import angle_increments


def _parts(cfg, key):
    ka, kd = jax.random.split(key)
    angles = 2.0 * jax.random.normal(ka, (2, 5, cfg.num_rope_angles))
    dt = jax.nn.softplus(jax.random.normal(kd, (2, 5, cfg.nheads)))
    return {"angles": angles}, dt


def test_default_is_the_paper_rule():
    cfg = ModelConfig(d_model=64, d_state=16, headdim=32, n_layer=1, vocab_size=8)
    assert cfg.rotation_dt is True
    parts, dt = _parts(cfg, jax.random.PRNGKey(0))
    inc = angle_increments(parts, dt, cfg)
    want = math.pi * np.tanh(np.asarray(parts["angles"]))[..., None, :] * np.asarray(dt)[..., None]
    np.testing.assert_allclose(np.asarray(inc), want, rtol=1e-6)


def test_rotation_dt_false_drops_dt():
    cfg = ModelConfig(d_model=64, d_state=16, headdim=32, n_layer=1, vocab_size=8,
                      rotation_dt=False)
    parts, dt = _parts(cfg, jax.random.PRNGKey(1))
    inc = np.asarray(angle_increments(parts, dt, cfg))
    want = math.pi * np.tanh(np.asarray(parts["angles"]))
    assert inc.shape == (2, 5, cfg.nheads, cfg.num_rope_angles)
    for h in range(cfg.nheads):  # every head turns by the same angle whatever its dt
        np.testing.assert_allclose(inc[:, :, h], want, rtol=1e-6)
    assert np.abs(inc).max() > 0.5 * math.pi  # reachable per step without a large dt


def test_rotation_dt_changes_only_data_dependent_rotation():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 8, (2, 12)), jnp.int32)
    outs = {}
    for rotation in ("data_dependent", "fixed", "none"):
        for flag in (True, False):
            cfg = ModelConfig(d_model=64, d_state=16, headdim=32, n_layer=1, vocab_size=8,
                              rotation=rotation, rotation_dt=flag, scan_backend="reference")
            outs[rotation, flag] = np.asarray(Mamba3LM(cfg, rngs=nnx.Rngs(0))(tokens))
    assert not np.allclose(outs["data_dependent", True], outs["data_dependent", False])
    for rotation in ("fixed", "none"):
        np.testing.assert_array_equal(outs[rotation, True], outs[rotation, False])


def test_rotation_dt_must_be_bool():
    with pytest.raises(ValueError, match="rotation_dt"):
        ModelConfig(rotation_dt=0)
