"""Optimizer: AdamW with a weight-decay mask, global-norm clipping and LR schedules.

Weight decay applies to matrices only. Every parameter name of the model is classified
explicitly (`decays`); a new, unclassified parameter raises, so a change to the model has to
decide whether it is decayed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

# Leaf names (last path component) of parameters that get weight decay: dense matrices.
DECAYED = frozenset({"kernel", "conv_weight", "lm_head"})
# Leaf names never decayed: norm gains, biases, dt_bias, D, MIMO scales.
NOT_DECAYED = frozenset({
    "weight",  # RMSNorm gains (norm1, norm2, final_norm)
    "norm",  # optional per-head output norm of the mixer
    "B_norm", "C_norm",  # BC norm gains
    "B_bias", "C_bias", "conv_bias", "dt_bias",
    "A_log",  # Mamba-2 baseline: data-independent decay (reference: _no_weight_decay)
    "D",
    "mimo_x", "mimo_z", "mimo_o",
})
EMBEDDING = "embedding"


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    names = [_key_name(k) for k in path]
    if len(names) > 1 and names[-1] == "value":  # nnx.State leaves: <param>.value
        names = names[:-1]
    return ".".join(names)


def decays(name: str, decay_embeddings: bool = False) -> bool:
    """Whether the parameter at dotted path `name` gets weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in DECAYED:
        return True
    if leaf in NOT_DECAYED:
        return False
    if leaf == EMBEDDING:
        return bool(decay_embeddings)
    raise ValueError(f"parameter {name!r} is not classified for weight decay: add its leaf name "
                     f"{leaf!r} to DECAYED or NOT_DECAYED in mamba3_jax/training/optim.py")


def decay_mask(params, decay_embeddings: bool = False):
    """A pytree of bools like `params`: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: decays(path_str(p), decay_embeddings), params)


# ----------------------------------------------------------------------------- schedules


def warmup_cosine(peak: float, warmup: int, total: int, end: float, init: float = 0.0):
    """Linear warmup from `init` to `peak` over `warmup` steps, then cosine to `end` at `total`.

    `step` counts completed updates (0 for the first one). Warmup gives update k (0-based) the
    rate init + (peak - init) (k + 1) / warmup, so the first update is not wasted and update
    warmup - 1 runs at `peak`; the decay starts at update `warmup` and ends at `total`.
    """
    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = init + (peak - init) * (step + 1) / max(warmup, 1)
        frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cos = end + 0.5 * (peak - end) * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(step < warmup, warm, cos)
    return fn


def warmup_linear(peak: float, warmup: int, total: int, end: float, init: float = 0.0):
    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = init + (peak - init) * (step + 1) / max(warmup, 1)
        frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        return jnp.where(step < warmup, warm, peak + (end - peak) * frac)
    return fn


def warmup_constant(peak: float, warmup: int, init: float = 0.0):
    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        return jnp.where(step < warmup, init + (peak - init) * (step + 1) / max(warmup, 1), peak)
    return fn


def warmup_stable_decay(peak: float, warmup: int, total: int, end: float, decay_fraction: float,
                        shape: str = "linear", init: float = 0.0):
    """WSD: warmup, constant `peak`, then decay to `end` over the last `decay_fraction` of steps."""
    decay_len = max(int(round(decay_fraction * total)), 1)
    decay_start = max(total - decay_len, warmup)

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = init + (peak - init) * (step + 1) / max(warmup, 1)
        frac = jnp.clip((step - decay_start) / max(total - decay_start, 1), 0.0, 1.0)
        if shape == "linear":
            w = 1.0 - frac
        elif shape == "sqrt":
            w = 1.0 - jnp.sqrt(frac)
        elif shape == "cosine":
            w = 0.5 * (1.0 + jnp.cos(math.pi * frac))
        else:
            raise ValueError(f"unknown WSD decay shape {shape!r}")
        return jnp.where(step < warmup, warm, end + (peak - end) * w)
    return fn


def make_schedule(optim_cfg, total_steps: int) -> Callable[[Any], jax.Array]:
    o = optim_cfg
    total = int(o.decay_steps or total_steps)
    if o.schedule == "cosine":
        return warmup_cosine(o.peak_lr, o.warmup_steps, total, o.end_lr, o.init_lr)
    if o.schedule == "linear":
        return warmup_linear(o.peak_lr, o.warmup_steps, total, o.end_lr, o.init_lr)
    if o.schedule == "constant":
        return warmup_constant(o.peak_lr, o.warmup_steps, o.init_lr)
    if o.schedule == "wsd":
        return warmup_stable_decay(o.peak_lr, o.warmup_steps, total, o.end_lr,
                                   o.wsd_decay_fraction, o.wsd_decay_shape, o.init_lr)
    raise ValueError(f"unknown schedule {o.schedule!r}")


def warmup_warning(optim_cfg, total_steps: int, n_params: int) -> Optional[str]:
    """One line when the warmup is far shorter than the recipe's (2,000 steps, ~1% of training)
    at a high peak LR, else None. A 180M model warmed up to 3e-3 in 10 steps diverged (issue
    11); small models tolerate short warmups, so the absolute floor applies from 100M params."""
    o = optim_cfg
    if o.peak_lr < 1e-3:
        return None
    warm, total = int(o.warmup_steps), int(o.decay_steps or total_steps)
    big = n_params >= 100_000_000
    if warm >= 0.01 * total and not (big and warm < 200):
        return None
    floor = f", and >= 200 for {n_params / 1e6:.0f}M params" if big else ""
    return (f"warning: optim.warmup_steps={warm} at peak LR {o.peak_lr:g} is far shorter than "
            f"the recipe's (~1% of the {total} steps{floor}); expect gradient-norm spikes or "
            "divergence")


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(optim_cfg, total_steps: int):
    """(optax transform, schedule). Clipping sees the raw gradient; AdamW decays masked params."""
    o = optim_cfg
    schedule = make_schedule(o, total_steps)
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        mask=lambda params: decay_mask(params, o.decay_embeddings)))
    return optax.chain(*parts), schedule
