"""The MFU numerator (flops.train_flops_per_token) against the model as implemented: the
dot_general FLOPs of a traced forward pass, scan bodies counted once per iteration; for every
mixer kind and a hybrid."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mamba3_jax.config import ModelConfig
from mamba3_jax.model import Mamba3LM
from mamba3_jax.training import flops


def dot_flops(jaxpr, mult: int = 1) -> int:
    """2 x output size x contraction size of every dot_general, nested jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[i] for i in contract)
            total += mult * 2 * math.prod(eqn.outvars[0].aval.shape) * k
        inner = mult * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for p in eqn.params.values():
            for q in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(q, "jaxpr", q)
                if hasattr(sub, "eqns"):
                    total += dot_flops(sub, inner)
    return total


@pytest.mark.parametrize("extra", [
    {}, {"mimo_rank": 2}, {"scan_layers": True},
    {"mixer": "attention"},
    {"layer_pattern": "MA", "attn_rope": False},
    {"layer_pattern": "MA", "scan_layers": True},
    {"mixer": "gated_deltanet"},  # no conv: its multiply-adds are not dot_generals
], ids=["siso", "mimo", "scan", "attention", "hybrid", "hybrid_scan", "gated_deltanet"])
def test_model_flops_match_the_traced_forward(extra):
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layer=2, d_state=32, headdim=32,
                      scan_backend="chunked", **extra)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Mamba3LM(cfg, rngs=nnx.Rngs(0))))
    B, L = 2, 256  # 4 chunks of 64 (SISO) / 8 of 32 (MIMO 2)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(
        state, jax.ShapeDtypeStruct((B, L), jnp.int32))
    per_token = dot_flops(jaxpr.jaxpr) / (B * L)
    # forward = 1/3 of the training count; the formula also counts the few non-matmul
    # parameters (norm gains, D, biases) and no per-sequence terms: agree within 1%
    assert per_token == pytest.approx(flops.train_flops_per_token(cfg, L) / 3, rel=1e-2)


def test_attention_flops_need_the_context_and_grow_with_it():
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layer=2, headdim=32, mixer="attention")
    with pytest.raises(ValueError, match="seq_len"):
        flops.train_flops_per_token(cfg)
    # 3 x 2 layers x 4 L x 4 heads x 32 channels more per token when L doubles from 256
    assert (flops.train_flops_per_token(cfg, 512) - flops.train_flops_per_token(cfg, 256)
            == 3 * 2 * 4 * 256 * 4 * 32)
    assert flops.mfu(1e6, cfg, 1e15, 1, 256) == pytest.approx(
        1e6 * flops.train_flops_per_token(cfg, 256) / 1e15)
