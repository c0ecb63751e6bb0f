"""Hybrids (`ModelConfig.layer_pattern`, e.g. the paper's "MMMMMA" with NoPE attention): the
layers get the pattern's mixers, the parameter count is exact, packed rows == separate
sequences, prefill + decode == forward across mixed caches, generation, config errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mamba3_jax.baselines.attention import Attention, KVCache
from mamba3_jax.config import ModelConfig
from mamba3_jax.convert import official_config
from mamba3_jax.generate import generate, prefill
from mamba3_jax.layers import Mamba3
from mamba3_jax.model import Mamba3LM, count_params
from tests.helpers import rel_err

CFG = ModelConfig(vocab_size=40, d_model=32, n_layer=2, d_state=16, headdim=8, chunk_size=8,
                  scan_backend="reference",  # cheapest to compile on CPU
                  layer_pattern="MA", attn_rope=False, d_mlp=64, mlp_multiple_of=32,
                  max_seq_len=32)
forward = nnx.jit(lambda m, t, s: m(t, segment_ids=s))


def test_layers_follow_the_pattern_and_count_exactly():
    model = Mamba3LM(CFG, rngs=nnx.Rngs(0))
    kinds = [type(layer.mixer) for layer in model.layers]
    assert kinds == [Mamba3, Attention]
    assert CFG.replace(n_layer=4).num_params() > CFG.num_params()
    assert count_params(model) == CFG.num_params()
    assert CFG.replace(layer_pattern="MMMMMA", n_layer=6).layer_mixer(5) == "attention"


TOKS = jax.random.randint(jax.random.PRNGKey(2), (1, 15), 0, CFG.vocab_size)


def test_packed_rows_equal_separate_sequences():
    model = Mamba3LM(CFG, rngs=nnx.Rngs(1))
    packed = forward(model, TOKS, jnp.asarray([[1] * 6 + [2] * 9]))
    assert rel_err(packed[:, :6], forward(model, TOKS[:, :6], None)) < 1e-5
    assert rel_err(packed[:, 6:], forward(model, TOKS[:, 6:], None)) < 1e-5


def test_prefill_then_decode_equals_forward():
    model = Mamba3LM(CFG, rngs=nnx.Rngs(1))
    toks = TOKS
    full = forward(model, toks, None)
    logits, cache = nnx.jit(lambda m, t: prefill(m, t))(model, toks[:, :10])
    assert isinstance(cache[1], KVCache) and not isinstance(cache[0], KVCache)
    assert rel_err(logits, full[:, 9]) < 1e-5
    step = nnx.jit(lambda m, t, c: m.step(t, c))
    for t in range(10, 15):
        logits, cache = step(model, toks[:, t], cache)
        assert rel_err(logits, full[:, t]) < 1e-5, t


def test_generate():
    model = Mamba3LM(CFG, rngs=nnx.Rngs(3))
    out = generate(model, jnp.ones((2, 4), jnp.int32), jax.random.PRNGKey(0), max_new_tokens=3)
    assert out.shape == (2, 3) and out.dtype == jnp.int32
    with pytest.raises(ValueError, match="max_seq_len"):  # the attention layers' KV cache
        generate(model, jnp.ones((1, 30), jnp.int32), jax.random.PRNGKey(0), max_new_tokens=3)


@pytest.mark.parametrize("bad, msg", [
    (dict(layer_pattern="MX"), "letters"),
    (dict(layer_pattern="MMA"), "multiple of len"),
    (dict(mixer="mamba2", d_conv=4), "leave mixer='mamba3'"),
])
def test_config_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        CFG.replace(**bad)


def test_uniform_pattern_may_scan_and_hybrids_convert():
    cfg = CFG.replace(layer_pattern="M", scan_layers=True)
    assert count_params(Mamba3LM(cfg, rngs=nnx.Rngs(0))) == cfg.num_params()
    oc = official_config(CFG.replace(a_activation="heavy_tail", d_mlp=128))
    assert oc["attn_layer_idx"] == [1] and oc["attn_cfg"]["rotary_emb_dim"] == 0  # NoPE


def test_paper_hybrid_config():
    import importlib.util

    from mamba3_jax.training.config import model_config, validate

    spec = importlib.util.spec_from_file_location("paper_cfg", "configs/paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("440m_hybrid")
    validate(c)
    mc = model_config(c, 100277)
    kinds = [mc.layer_mixer(i) for i in range(mc.n_layer)]
    assert kinds.count("attention") == 4 and kinds[5] == kinds[11] == "attention"
    assert not mc.attn_rope and mc.scan_layers and mc.scan_group == 6


def _layer_params(model) -> dict:
    """{layer: that layer's parameters} from either layer layout."""
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    cfg = model.cfg
    if not cfg.scan_layers:
        return dict(tree["layers"])
    out = {}
    for i in range(cfg.n_layer):
        (_, *pos), index = cfg.stacked_location(i)
        sub = tree["blocks"][pos[0]] if pos else tree["blocks"]
        out[i] = jax.tree.map(lambda x, index=index: x[index], sub)
    return out


def test_scanned_hybrid_equals_unrolled():
    """scan_layers on a hybrid (one scan step = one period "MA", repeated twice): same initial
    weights, loss and gradients (packed rows, remat per block inside the scan step), chunked
    prefill + decode through the stacked caches."""
    cfg = CFG.replace(n_layer=4)
    a = Mamba3LM(cfg, rngs=nnx.Rngs(4))
    b = Mamba3LM(cfg.replace(scan_layers=True), rngs=nnx.Rngs(4))
    assert count_params(b) == cfg.num_params()
    assert nnx.state(b)["blocks"][1]["mixer"]["q_proj"]["kernel"].shape == (2, 32, 32)
    pa, pb = _layer_params(a), _layer_params(b)
    assert all(rel_err(x, y) == 0 for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb),
                                                   strict=True))
    seg = jnp.asarray([[1] * 6 + [2] * 9])

    def loss_and_grads(model, remat):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            m = nnx.merge(graphdef, p, rest)
            h, _ = m.features(TOKS, segment_ids=seg, remat=remat)
            return jnp.mean(jax.nn.log_softmax(m.logits(h))[..., 3])

        value, g = jax.jit(jax.value_and_grad(loss))(params)
        return value, _layer_params(nnx.merge(graphdef, g, rest))

    (la, ga), (lb, gb) = loss_and_grads(a, "none"), loss_and_grads(b, "full")
    assert abs(float(la - lb)) < 1e-6 * abs(float(la))
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        assert rel_err(y, x) < 1e-5
    full = forward(a, TOKS, None)
    logits, cache = nnx.jit(lambda m, t: prefill(m, t, 4))(b, TOKS[:, :10])  # chunked prefill
    assert isinstance(cache[1], KVCache) and cache[1].k.shape[0] == 2  # stacked over repeats
    assert rel_err(logits, full[:, 9]) < 1e-5
    step = nnx.jit(lambda m, t, c: m.step(t, c))
    for t in range(10, 15):
        logits, cache = step(b, TOKS[:, t], cache)
        assert rel_err(logits, full[:, t]) < 1e-5, t
