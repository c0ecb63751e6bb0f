"""Weight-decay mask, LR schedules and FLOP counting."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from mamba3_jax.config import ModelConfig
from mamba3_jax.model import Mamba3LM
from mamba3_jax.training import flops
from mamba3_jax.training.optim import decay_mask, make_optimizer, make_schedule, path_str

# A model with every kind of parameter: MIMO scales, output norm, short conv, untied head.
FULL = ModelConfig(vocab_size=64, d_model=32, n_layer=1, d_state=8, headdim=16, mimo_rank=2,
                   is_outproj_norm=True, d_conv=4, tie_embeddings=False, d_mlp=32,
                   mlp_multiple_of=16)
DECAYED = {
    "layers.0.mixer.in_proj.kernel", "layers.0.mixer.out_proj.kernel",
    "layers.0.mixer.conv_weight", "layers.0.mlp.fc1.kernel", "layers.0.mlp.fc2.kernel",
    "lm_head",
}
NOT_DECAYED = {
    "embed.embedding", "final_norm.weight", "layers.0.norm1.weight", "layers.0.norm2.weight",
    "layers.0.mixer.dt_bias", "layers.0.mixer.D", "layers.0.mixer.B_norm",
    "layers.0.mixer.C_norm", "layers.0.mixer.B_bias", "layers.0.mixer.C_bias",
    "layers.0.mixer.mimo_x", "layers.0.mixer.mimo_z", "layers.0.mixer.mimo_o",
    "layers.0.mixer.norm", "layers.0.mixer.conv_bias",
}


def _params(cfg=FULL):
    """Parameter pytree with the model's names and shapes (abstract init: nothing is computed),
    filled with ones."""
    abstract = nnx.eval_shape(lambda: Mamba3LM(cfg, rngs=nnx.Rngs(0)))
    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)


def _flat(tree):
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _optim_cfg(**kw):
    c = ml_collections.ConfigDict(dict(
        peak_lr=0.1, end_lr=0.01, init_lr=0.0, warmup_steps=10, schedule="cosine",
        decay_steps=0, wsd_decay_fraction=0.2, wsd_decay_shape="linear", b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.5, decay_embeddings=False, clip_norm=1.0))
    c.update(kw)
    return c


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask_covers_exactly_the_intended_params(decay_embeddings):
    params = _params()
    mask = _flat(decay_mask(params, decay_embeddings))
    assert set(mask) == DECAYED | NOT_DECAYED  # every parameter is classified
    want = DECAYED | ({"embed.embedding"} if decay_embeddings else set())
    assert {k for k, v in mask.items() if v} == want


def test_optimizer_applies_the_mask():
    """With zero gradients AdamW only shrinks the decayed parameters."""
    params = _params()
    tx, _ = make_optimizer(_optim_cfg(warmup_steps=0), 100)
    grads = jax.tree.map(jnp.zeros_like, params)
    @jax.jit
    def one_step(params, grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = _flat(one_step(params, grads))
    old = _flat(params)
    changed = {k for k in old if not np.array_equal(np.asarray(old[k]), np.asarray(new[k]))}
    assert changed == DECAYED
    k = "layers.0.mlp.fc1.kernel"
    np.testing.assert_allclose(new[k], old[k] * (1 - 0.1 * 0.5), rtol=1e-6)


def test_unclassified_param_raises():
    with pytest.raises(ValueError, match="not classified"):
        decay_mask({"layers": {0: {"mixer": {"new_thing": jnp.zeros(3)}}}})


def test_warmup_cosine_schedule():
    s = make_schedule(_optim_cfg(), 110)
    lr = [float(s(i)) for i in range(111)]
    np.testing.assert_allclose(lr[0], 0.01, rtol=1e-6)  # first update: peak / warmup
    np.testing.assert_allclose(lr[9], 0.1, rtol=1e-6)
    np.testing.assert_allclose(lr[10], 0.1, rtol=1e-6)
    np.testing.assert_allclose(lr[60], 0.01 + 0.5 * 0.09, rtol=1e-5)  # half-way
    np.testing.assert_allclose(lr[110], 0.01, rtol=1e-6)  # floor
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))


def test_warmup_stable_decay_schedule():
    s = make_schedule(_optim_cfg(schedule="wsd", wsd_decay_fraction=0.25), 100)
    lr = [float(s(i)) for i in range(101)]
    assert all(abs(x - 0.1) < 1e-7 for x in lr[9:75])  # stable
    np.testing.assert_allclose(lr[100], 0.01, rtol=1e-6)
    np.testing.assert_allclose(lr[87], 0.1 - 0.09 * 12 / 25, rtol=1e-5)
    s = make_schedule(_optim_cfg(schedule="constant"), 100)
    assert float(s(500)) == pytest.approx(0.1)


def test_flops_counting():
    cfg = ModelConfig(vocab_size=257, d_model=128, n_layer=2, d_state=32, headdim=64)
    C, R, N, P, H = 64, 1, 32, 64, 4
    ssm = H * (2 * C * R * R * (N + P) + 4 * R * P * N)
    assert flops.ssm_flops_per_token(cfg) == ssm
    assert flops.train_flops_per_token(cfg) == 6 * cfg.num_params() + 3 * 2 * ssm
    untied = cfg.replace(tie_embeddings=False)
    assert flops.matmul_params(untied) == untied.num_params() - 257 * 128
    mimo = cfg.replace(mimo_rank=4)  # chunk 16: R^2 C grows 4x per chunk token
    assert flops.ssm_flops_per_token(mimo) == H * (2 * 16 * 16 * (N + P) + 4 * 4 * P * N)
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("TPU v5 lite") == 197e12
    assert flops.peak_flops("cpu") is None
    assert flops.mfu(1000.0, cfg, None, 1) is None
    assert flops.mfu(1e6, cfg, 1e15, 2) == pytest.approx(
        1e6 * flops.train_flops_per_token(cfg) / 2e15)


def test_warmup_warning_only_for_short_warmups_at_high_lr():
    from mamba3_jax.training.optim import warmup_warning

    # the run: 180M params, peak 3e-3 after 10 warmup steps
    msg = warmup_warning(_optim_cfg(peak_lr=3e-3, warmup_steps=10), 60, 164_000_000)
    assert msg.startswith("warning:") and "\n" not in msg and "warmup_steps=10" in msg
    # the paper recipe (2000 of 190,734 steps), a low LR, a small model warmed over 10%: quiet
    assert warmup_warning(_optim_cfg(peak_lr=3e-3, warmup_steps=2000), 190_734,
                          164_000_000) is None
    assert warmup_warning(_optim_cfg(peak_lr=5e-4, warmup_steps=10), 60, 164_000_000) is None
    assert warmup_warning(_optim_cfg(peak_lr=3e-3, warmup_steps=40), 400, 450_000) is None
    # under 1% of the schedule warns at any size; decay_steps sets the schedule length
    assert warmup_warning(_optim_cfg(peak_lr=1e-3, warmup_steps=100), 20_000, 450_000)
    assert warmup_warning(_optim_cfg(peak_lr=1e-3, warmup_steps=100, decay_steps=5000),
                          20_000, 450_000) is None
