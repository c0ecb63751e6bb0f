"""Train one model at several peak learning rates at once (vmapped parameter copies).

Small synthetic-task models are launch-bound on a GPU, so a sweep over K learning rates costs
about one run. Every copy sees the same batches and starts from the same initialisation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mamba3_jax.config import ModelConfig
from mamba3_jax.model import Mamba3LM
from mamba3_jax.training.optim import decay_mask
from mamba3_jax.training.step import make_grad_fn

BATCH_KEYS = ("inputs", "targets", "positions", "loss_mask")


class LRSweep:
    """AdamW (0.9, 0.95), clip 1.0, warmup + cosine to 1% of peak, for each peak in `lrs`."""

    def __init__(self, cfg: ModelConfig, lrs: Sequence[float], total_steps: int, *,
                 warmup: int = 500, weight_decay: float = 0.1, seed: int = 0):
        model = Mamba3LM(cfg, rngs=nnx.Rngs(seed))
        self.graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
        params, self.frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
        self.lrs = tuple(float(x) for x in lrs)
        n = len(self.lrs)
        sched = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total_steps, end_value=1e-2)
        adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
        tx = optax.chain(optax.clip_by_global_norm(1.0), adamw(
            learning_rate=1.0, b1=0.9, b2=0.95, weight_decay=weight_decay,
            mask=decay_mask(params)))
        self.params = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), params)
        self.opt_state = jax.vmap(tx.init)(self.params)
        self.peaks = jnp.asarray(self.lrs, jnp.float32)
        grads_of, frozen_ = make_grad_fn(self.graphdef), self.frozen

        def one(params, opt_state, peak, batch, step):
            g, aux = grads_of(params, frozen_, batch)
            clip, adam = opt_state
            hp = dict(adam.hyperparams)
            hp["learning_rate"] = peak * sched(step)
            updates, opt_state = tx.update(g, (clip, adam._replace(hyperparams=hp)), params)
            loss = aux["sum_nll"] / jnp.maximum(aux["tokens"], 1.0)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None)), donate_argnums=(0, 1))

    def step(self, batch: dict, step: int) -> np.ndarray:
        """One update of every copy on a numpy batch; returns the losses (K,) (async)."""
        b = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
        b["target_bytes"] = jnp.zeros_like(b["inputs"])
        self.params, self.opt_state, losses = self._step(self.params, self.opt_state, self.peaks,
                                                         b, step)
        return losses

    def state(self) -> list[np.ndarray]:
        """Every copy's parameters and optimizer state as host arrays (a resumable snapshot)."""
        return [np.asarray(x) for x in jax.tree.leaves((self.params, self.opt_state))]

    def load_state(self, arrays: Sequence[np.ndarray]) -> None:
        """Restore a `state()` snapshot of a sweep built with the same config and rates."""
        leaves, treedef = jax.tree.flatten((self.params, self.opt_state))
        if len(arrays) != len(leaves) or any(
                np.shape(a) != x.shape or np.asarray(a).dtype != x.dtype
                for a, x in zip(arrays, leaves, strict=True)):
            raise ValueError("the snapshot was taken from another model or learning-rate list")
        self.params, self.opt_state = jax.tree.unflatten(
            treedef, [jnp.asarray(a) for a in arrays])

    def apply(self, fn: Callable) -> Callable:
        """A jitted evaluation of fn(model, *args) for every copy: returns (K, ...) outputs."""
        graphdef, frozen = self.graphdef, self.frozen

        def per_copy(params, args):
            return fn(nnx.merge(graphdef, params, frozen), *args)

        jitted = jax.jit(jax.vmap(per_copy, in_axes=(0, None)))
        return lambda *args: jitted(self.params, tuple(jnp.asarray(a) for a in args))
