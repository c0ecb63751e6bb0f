"""The Mamba-3 language model: tied embedding, pre-norm [Mamba-3, SwiGLU] blocks, final RMSNorm.

Usage:
    model = Mamba3LM(ModelConfig(...), rngs=nnx.Rngs(0))
    logits = model(tokens, segment_ids=...)                 # training / scoring
    logits, cache = model(prompt, return_cache=True)        # prefill
    logits_t, cache = model.step(next_token, cache)         # decode one token

Layers: `cfg.scan_layers=False` keeps a list of Blocks (`layers.<i>.<name>`); True stacks the
n_layer Blocks' variables along a leading axis in one Block (`blocks.<name>`, shape
(n_layer, ...)) applied with `jax.lax.scan`, so one layer is traced and compiled once. A hybrid
`layer_pattern` of period g (e.g. "MMMMMA") scans over its n_layer / g repeats instead: one
stacked Block per position of the pattern (`blocks.<j>.<name>`, shape (n_layer / g, ...), layer
i at position i % g, index i // g; `ModelConfig.stacked_location`), one scan step applying the g
layers in order. All are initialised from the same random stream (equal seeds give equal
weights) and compute the same function; the decode cache is a list of per-layer caches, one
stacked cache, or (hybrid) a list of g caches stacked over the repeats respectively.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mamba3_jax.config import STACKED, ModelConfig, parse_remat
from mamba3_jax.layers import Block
from mamba3_jax.nn import Frozen, RMSNorm
from mamba3_jax.ops.embedding import embed_lookup
from mamba3_jax.ops.matmul import einsum_f32
from mamba3_jax.ops.ssm import reset_from_positions, reset_from_segment_ids


def segment_reset(segment_ids: Optional[jax.Array], positions: Optional[jax.Array]):
    """Where packed documents start: from positions (== 0) if given, else from segment ids."""
    if positions is not None:
        return reset_from_positions(positions)
    if segment_ids is not None:
        return reset_from_segment_ids(segment_ids)
    return None


# STACKED ("blocks", defined in config.py) names the stacked-layers attribute: every variable
# below it has a leading layer axis (the sharding rules in training/mesh.py never shard it).


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """Modules of one structure -> one module whose variables are stacked along axis 0."""
    splits = [nnx.split(m) for m in modules]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in splits])
    return nnx.merge(splits[0][0], stacked)


def remat_policy(spec: str) -> Optional[Callable]:
    """`jax.checkpoint` policy of a remat spec (config.parse_remat); "none" -> no checkpoint is
    wanted (the caller checks), "full" -> None (jax's default: save nothing)."""
    kind, names = parse_remat(spec)
    cp = jax.checkpoint_policies
    if "kernels" in names:  # a policy sees the primitives inside a custom_vjp's forward rule
        names = tuple(n for n in names if n != "kernels")
        return cp.save_from_both_policies(
            cp.save_only_these_names(*names) if names else cp.nothing_saveable,
            _pallas_outputs_saveable)
    return {"none": None, "full": None, "dots": cp.dots_saveable,
            "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
            "names": cp.save_only_these_names(*names) if names else None}[kind]


def _pallas_outputs_saveable(prim, *_, **__) -> bool:
    return prim.name == "pallas_call"


def apply_layer(graphdef, remat: str, *, prevent_cse: bool = True) -> Callable:
    """(layer state, h, cache, reset, backend) -> (h, cache) of one Block, rematerialised per
    `remat` (backend is static)."""
    def fn(state, h, cache, reset, backend):
        return nnx.merge(graphdef, state)(h, reset=reset, cache=cache, backend=backend)

    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=remat_policy(remat), prevent_cse=prevent_cse,
                          static_argnums=(4,))


@functools.lru_cache(maxsize=64)
def _jitted_layer(graphdef, remat: str) -> Callable:
    """`apply_layer` under its own jit, one per distinct layer: the unrolled layers of a model
    are alike, so the first one is traced and lowered and the rest reuse it (the outer jit's
    program calls it once per layer; XLA inlines the calls before it optimises)."""
    return jax.jit(apply_layer(graphdef, remat), static_argnums=(4,))


def _layer_fn(graphdef, remat: str) -> Callable:
    try:
        return _jitted_layer(graphdef, remat)
    except TypeError:  # a graph definition that cannot be hashed: traced per layer, as before
        return apply_layer(graphdef, remat)


class Mamba3LM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                               param_dtype=jnp.dtype(cfg.param_dtype),
                               embedding_init=nnx.initializers.normal(cfg.initializer_range),
                               rngs=rngs)
        blocks = [Block(cfg, rngs=rngs, layer=i) for i in range(cfg.n_layer)]
        g = cfg.scan_group
        if cfg.scan_layers and g == 1:
            setattr(self, STACKED, stack_modules(blocks))
        elif cfg.scan_layers:  # hybrid: the layers of each pattern position stacked apart
            setattr(self, STACKED, nnx.List([stack_modules(blocks[j::g]) for j in range(g)]))
        else:
            self.layers = nnx.List(blocks)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(nnx.initializers.normal(cfg.initializer_range)(
                rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype)))

    def _stacks(self) -> list:
        """scan_layers: the stacked Blocks applied in order by one scan step (one, or one per
        position of a hybrid pattern)."""
        stacked = getattr(self, STACKED)
        return [stacked] if self.cfg.scan_group == 1 else list(stacked)

    def _stack_caches(self, cache) -> list:
        """A scan_layers cache (or None) as one entry per stacked Block."""
        if cache is None:
            return [None] * self.cfg.scan_group
        return [cache] if self.cfg.scan_group == 1 else list(cache)

    def _unstack_caches(self, caches: list):
        return caches[0] if self.cfg.scan_group == 1 else caches

    def init_cache(self, batch: int):
        """Per-layer decode caches: a list, or one cache stacked along axis 0 (scan_layers; a
        hybrid pattern: a list of one such cache per pattern position)."""
        if self.cfg.scan_layers:
            reps = self.cfg.n_layer // self.cfg.scan_group
            return self._unstack_caches([  # init_cache uses the config only
                jax.tree.map(lambda x: jnp.broadcast_to(x, (reps,) + x.shape),
                             s.mixer.init_cache(batch)) for s in self._stacks()])
        return [layer.mixer.init_cache(batch) for layer in self.layers]

    def head_input(self, h: jax.Array) -> jax.Array:
        """Final RMSNorm of the residual stream, in the compute dtype (the LM head's input)."""
        return self.final_norm(h).astype(jnp.dtype(self.cfg.dtype))

    def head_weight(self) -> jax.Array:
        """The LM head (d, V) in the master dtype: the tied embedding's transpose or lm_head."""
        return self.embed.embedding[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.head_input(h)
        return einsum_f32("...d,dv->...v", h, self.head_weight().astype(h.dtype))

    def features(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None, cache=None,
                 backend: Optional[str] = None, remat: str = "none"):
        """tokens (B, L) -> (residual stream after the last block (B, L, d) float32, caches).

        `logits(features)` gives the logits; a loss can apply it chunk by chunk to keep the
        (B, L, V) logits out of memory (see `mamba3_jax.training.step`). `remat` (a
        config.parse_remat spec) rematerialises each block in the backward pass."""
        reset = segment_reset(segment_ids, positions)
        # residual stream kept in float32; the lookup's own gradient (ops/embedding.py)
        h = embed_lookup(self.embed.embedding[...], tokens, jnp.dtype(self.cfg.dtype))
        if self.cfg.scan_layers:
            return self._scan_layers(h, reset, cache, backend, remat)
        caches = [None] * self.cfg.n_layer if cache is None else cache
        new_caches = []
        for layer, c in zip(self.layers, caches, strict=True):
            graphdef, state = nnx.split(layer)
            h, c = _layer_fn(graphdef, remat)(state, h, c, reset, backend)
            new_caches.append(c)
        return h, new_caches

    def _scan_layers(self, h, reset, cache, backend, remat):
        splits = [nnx.split(s) for s in self._stacks()]
        # inside a scan, CSE cannot merge the recomputation into the forward (jax docs)
        layers = [apply_layer(graphdef, remat, prevent_cse=False) for graphdef, _ in splits]

        def body(h, xs):  # one period of the pattern, each Block rematerialised on its own
            out = []
            for layer, st, c in zip(layers, *xs, strict=True):
                h, c = layer(st, h, c, reset, backend)
                out.append(c)
            return h, out

        h, caches = jax.lax.scan(body, h, ([st for _, st in splits], self._stack_caches(cache)))
        return h, self._unstack_caches(caches)

    def __call__(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None, cache=None, return_cache: bool = False,
                 backend: Optional[str] = None):
        """tokens (B, L) int -> logits (B, L, V) float32 [, cache].

        Packed sequences: pass `positions` (restart at 0 per document) or `segment_ids`; the
        recurrent state restarts at each document start.
        """
        h, caches = self.features(tokens, segment_ids=segment_ids, positions=positions,
                                  cache=cache, backend=backend)
        logits = self.logits(h)
        return (logits, caches) if return_cache else logits

    def step(self, token: jax.Array, cache):
        """Decode one token per sequence: token (B,) -> (logits (B, V), cache)."""
        h = self.embed(token).astype(jnp.float32)
        if self.cfg.scan_layers:
            splits = [nnx.split(s) for s in self._stacks()]

            def body(h, xs):
                out = []
                for (graphdef, _), st, c in zip(splits, *xs, strict=True):
                    h, c = nnx.merge(graphdef, st).step(h, c)
                    out.append(c)
                return h, out

            h, caches = jax.lax.scan(body, h, ([st for _, st in splits],
                                               self._stack_caches(cache)))
            return self.logits(h), self._unstack_caches(caches)
        new_caches = []
        for layer, c in zip(self.layers, cache, strict=True):
            h, c = layer.step(h, c)
            new_caches.append(c)
        return self.logits(h), new_caches


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (nnx.Param leaves); frozen buffers are not counted."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count_frozen(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, Frozen)))
