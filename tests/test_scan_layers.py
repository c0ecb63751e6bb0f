"""Scan over layers (`ModelConfig.scan_layers`) == the unrolled model: same initial weights, logits,
gradients under every remat policy, decode and generation; remat really recomputes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba3_jax.config import ModelConfig, parse_remat
from mamba3_jax.generate import generate
from mamba3_jax.model import Mamba3LM, count_params
from tests.helpers import rel_err

CFG = ModelConfig(vocab_size=50, d_model=32, n_layer=3, d_state=16, headdim=16, chunk_size=8,
                  mimo_rank=2, d_conv=4)


def _pair(cfg=CFG):
    return Mamba3LM(cfg, rngs=nnx.Rngs(0)), Mamba3LM(cfg.replace(scan_layers=True),
                                                     rngs=nnx.Rngs(0))


def _unstacked(scanned_tree, n_layer):
    """{'blocks': stacked} -> {'layers': {i: layer i}} so both layouts compare leaf by leaf."""
    tree = dict(scanned_tree)
    stacked = tree.pop("blocks")
    tree["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layer)}
    return tree


def _assert_trees_close(a, b, tol):
    fa, fb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb, strict=True):
        assert x.shape == y.shape, path
        assert rel_err(x, y) <= tol, (path, rel_err(x, y))


def test_same_weights_parameter_count_and_layout():
    unrolled, scanned = _pair()
    assert count_params(scanned) == count_params(unrolled) == CFG.num_params()
    pa = nnx.to_pure_dict(nnx.state(unrolled))
    pb = nnx.to_pure_dict(nnx.state(scanned))
    assert pb["blocks"]["mixer"]["in_proj"]["kernel"].shape == (3, 32, CFG.d_in_proj)
    assert "layers" not in pb
    _assert_trees_close(_unstacked(pb, 3), pa, 0.0)  # same random stream: bit-equal init


def test_logits_and_gradients_match_the_unrolled_model():
    unrolled, scanned = _pair()
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 21), 0, CFG.vocab_size)
    seg = jnp.array([[1] * 9 + [2] * 12, [1] * 21])

    def grads(model, remat):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            m = nnx.merge(graphdef, p, rest)
            h, _ = m.features(toks, segment_ids=seg, remat=remat)
            lg = m.logits(h)
            return jnp.mean(jax.nn.log_softmax(lg)[..., 3]), lg

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    g_ref, lg_ref = grads(unrolled, "none")
    g_ref = nnx.to_pure_dict(g_ref)
    for remat in ("none", "full"):
        g, lg = grads(scanned, remat)
        assert rel_err(lg, lg_ref) < 1e-6, remat
        _assert_trees_close(_unstacked(nnx.to_pure_dict(g), 3), g_ref, 1e-5)
    g_names, _ = grads(unrolled, "names:in_proj,mlp_hidden")  # remat on the unrolled path too
    _assert_trees_close(nnx.to_pure_dict(g_names), g_ref, 1e-5)


def test_remat_policy_recomputes_in_the_backward_pass():
    _, scanned = _pair(CFG.replace(n_layer=2))
    graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)
    toks = jnp.zeros((2, 16), jnp.int32)

    def loss(p, remat):
        h, _ = nnx.merge(graphdef, p, rest).features(toks, remat=remat)
        return jnp.sum(h)

    def prims(remat):
        jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, remat)
        return str(jaxpr)

    assert "checkpoint" not in prims("none") and "remat" not in prims("none")
    for remat in ("full", "dots", "names:ssm_out"):
        assert "checkpoint" in prims(remat) or "remat" in prims(remat), remat


def test_parse_remat():
    assert parse_remat("full") == ("full", ())
    assert parse_remat("names:in_proj, mlp_out") == ("names", ("in_proj", "mlp_out"))
    for bad in ("some", "names:", "names:nope", 3):
        with pytest.raises(ValueError, match="remat"):
            parse_remat(bad)


def test_decode_and_generation_with_stacked_caches():
    unrolled, scanned = _pair(CFG.replace(d_conv=0))
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 13), 0, CFG.vocab_size)
    fwd = nnx.jit(lambda m, t: m(t, return_cache=True))
    step = nnx.jit(lambda m, t, c: m.step(t, c))
    full_b = nnx.jit(lambda m, t: m(t))(scanned, toks)
    lg, cache = fwd(scanned, toks[:, :9])
    assert cache.ssm.h.shape[0] == 3  # one stacked cache, layer axis first
    outs = [lg]
    for t in range(9, 13):
        lt, cache = step(scanned, toks[:, t], cache)
        outs.append(lt[:, None])
    assert rel_err(jnp.concatenate(outs, axis=1), full_b) < 1e-5
    # prefill in scanned pieces + in-jit decode loop: same tokens as the unrolled model
    a = generate(unrolled, toks, jax.random.PRNGKey(3), max_new_tokens=4, prefill_chunk=5)
    b = generate(scanned, toks, jax.random.PRNGKey(3), max_new_tokens=4, prefill_chunk=5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


REMAT_PAPER = "names:in_proj,ssm_out,mixer_out,mlp_hidden"


def _forward_kernel_copies(remat, monkeypatch):
    """How many times each Pallas kernel is lowered in a 2-layer scanned model's value and
    gradient, lowered for CUDA on this host (a recomputed forward kernel is lowered twice)."""
    import collections
    import re

    import pallas_kernels
    from mamba3_jax import backends

    class _OnGpu:  # what resolve() and the kernel wrapper ask; lowering needs no device
        def __getattr__(self, name):
            return getattr(jax, name)

        def default_backend(self):
            return "gpu"

    monkeypatch.setattr(backends, "jax", _OnGpu())
    monkeypatch.setattr(pallas_kernels, "on_gpu", lambda: True)
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layer=2, d_state=64, headdim=32,
                      chunk_size=16, scan_backend="pallas", scan_layers=True, dtype="bfloat16")
    graphdef, params, rest = nnx.split(Mamba3LM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    toks = jnp.zeros((2, 64), jnp.int32)

    def loss(p):
        h, _ = nnx.merge(graphdef, p, rest).features(toks, remat=remat)
        return jnp.sum(h.astype(jnp.float32))

    text = jax.jit(jax.value_and_grad(loss)).trace(params).lower(
        lowering_platforms=("cuda",)).as_text()
    return collections.Counter(re.findall(r'name\s*=\s*"(mamba3_[a-z_]+)"', text))


def test_kernels_remat_keeps_the_ssm_forward_kernels_from_running_twice(monkeypatch):
    """Under a names policy the SSM's forward kernels are recomputed in the backward pass (their
    residuals sit behind a custom_vjp); adding "kernels" saves every Pallas kernel's outputs."""
    forward = ("mamba3_rotate_qk", "mamba3_ssd_state", "mamba3_ssd_output")
    names = _forward_kernel_copies(REMAT_PAPER, monkeypatch)
    kept = _forward_kernel_copies(REMAT_PAPER + ",kernels", monkeypatch)
    assert all(names[k] == 2 for k in forward), names
    assert all(kept[k] == 1 for k in forward), kept
    assert kept["mamba3_ssd_grad_dq"] == names["mamba3_ssd_grad_dq"] == 1


def test_kernels_remat_gradients_match():
    cfg = CFG.replace(scan_backend="pallas_interpret", scan_layers=True, mimo_rank=1,
                      n_layer=2, d_conv=0, chunk_size=16)
    graphdef, params, rest = nnx.split(Mamba3LM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    toks = jax.random.randint(jax.random.PRNGKey(3), (2, 24), 0, cfg.vocab_size)

    def grads(remat):
        def loss(p):
            h, _ = nnx.merge(graphdef, p, rest).features(toks, remat=remat)
            return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p, rest).logits(h))[..., 3])
        return nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))

    ref = grads("none")
    _assert_trees_close(grads(REMAT_PAPER + ",kernels"), ref, 1e-5)
    _assert_trees_close(grads("names:kernels"), ref, 1e-5)
