"""The functional train and eval steps (split the NNX model once, jit pure functions of arrays).

Train state (a dict, so orbax saves it as is):
    step       int32 ()            completed optimizer updates
    params     pure dict           nnx.Param leaves (float32 master weights)
    frozen     pure dict           other model variables (e.g. frozen B/C biases), never updated
    opt_state  optax state
    rng        uint32 key data     split once per step (the model has no dropout today)
    finite     bool ()             False once a non-finite loss / grad norm / param norm was seen

A step whose loss or grad norm is not finite leaves the state unchanged and sets `finite` False;
every later step is a no-op too, so the host (which reads metrics one step late) still finds the
last good state on the device when it notices. A new param norm that is not finite (finite
gradients through AdamW cannot make one, short of an overflow) sets `finite` False too, but that
step's update has been applied (`update_applied_nonfinite`): the last good state is then the last
checkpoint. Deciding before the update lets XLA fold the guard's select into the optimizer's
elementwise pass; a guard on the new param norm needed a second pass over the parameters and
both moments (~35 GB a step at 1.5B).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mamba3_jax.config import ModelConfig
from mamba3_jax.model import Mamba3LM
from mamba3_jax.training.loss import chunked_cross_entropy
from mamba3_jax.training.mesh import BATCH_AXES

LN2 = math.log(2.0)


class StepConfig(NamedTuple):
    """Static settings baked into the compiled step."""

    grad_accum: int = 1
    loss_chunk: int = 0  # >0: logits and loss computed this many positions at a time
    remat: str = "none"  # per-block rematerialisation (config.parse_remat)
    inject_nan_at_step: int = -1  # 1-based step whose loss is made NaN (debugging)
    check_finite: bool = True
    # more than one device: the loss and gradients per device on its batch rows (shard_map),
    # then summed over devices (psum): opaque kernels see their shard only. Parameters sharded
    # along fsdp are gathered whole at the step's start (ZeRO-1-like peak memory).
    manual_data_parallel: bool = True


def model_graphdef(cfg: ModelConfig):
    abstract = nnx.eval_shape(lambda: Mamba3LM(cfg, rngs=nnx.Rngs(0)))
    graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
    return graphdef


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> dict:
    """A fresh train state (call under jit with out_shardings to create it sharded)."""
    model = Mamba3LM(cfg, rngs=nnx.Rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "frozen": nnx.to_pure_dict(rest),
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
        "finite": jnp.ones((), bool),
    }


def _nll_and_hits(model, h, targets):
    logits = model.logits(h)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nll, (jnp.argmax(logits, -1) == targets).astype(jnp.float32)


def loss_sums(graphdef, params, frozen, batch, nll_scale=1.0, loss_chunk: int = 0,
              remat: str = "none"):
    """Masked sums over one (micro)batch: (sum nll [nats], aux dict of sums).

    loss_chunk > 0: the logits are formed `loss_chunk` positions at a time and the head's
    gradient in the same pass (training/loss.py), so (B, L, V) logits never exist."""
    model = nnx.merge(graphdef, params, frozen)
    h, _ = model.features(batch["inputs"], positions=batch["positions"], remat=remat)
    mask = batch["loss_mask"].astype(jnp.float32)
    if loss_chunk:
        sum_nll, correct = chunked_cross_entropy(model.head_input(h), model.head_weight(),
                                                 batch["targets"], mask, loss_chunk)
    else:
        nll, hits = _nll_and_hits(model, h, batch["targets"])
        sum_nll, correct = jnp.sum(nll * mask), jnp.sum(hits * mask)
    sum_nll = sum_nll * nll_scale
    aux = {"sum_nll": sum_nll, "tokens": jnp.sum(mask),
           "bytes": jnp.sum(batch["target_bytes"].astype(jnp.float32)), "correct": correct}
    return sum_nll, aux


def _microbatches(batch: dict, k: int, mesh: Mesh | None) -> dict:
    """(B, ...) -> (k, B/k, ...); microbatch i holds rows i, i+k, ... so each one spans all
    devices of the batch sharding."""
    def split(x):
        b = x.shape[0]
        y = jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
        if mesh is not None:
            spec = P(None, BATCH_AXES, *([None] * (x.ndim - 1)))
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
        return y
    return jax.tree.map(split, batch)


def uses_manual_data_parallel(mesh: Mesh | None, manual: bool = True) -> bool:
    """Whether the step runs per device (`StepConfig.manual_data_parallel`): a mesh whose batch
    axes span more than one device."""
    return (manual and mesh is not None
            and math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape) > 1)


def _summed_over_devices(sums, mesh: Mesh):
    """sums(params, frozen, batch, nll_scale), run per device on its batch rows with the whole
    parameters (fsdp shards gathered on entry), the results summed over the devices."""
    def local(params, frozen, batch, nll_scale):
        return jax.lax.psum(sums(params, frozen, batch, nll_scale), BATCH_AXES)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(BATCH_AXES), P()),
                         out_specs=(P(), P()), check_vma=False)


def make_grad_fn(graphdef, grad_accum: int = 1, mesh: Mesh | None = None, loss_chunk: int = 0,
                 remat: str = "none", manual_data_parallel: bool = True):
    """(params, frozen, batch, nll_scale) -> (grads of the masked mean loss, aux sums).

    With grad_accum = k the batch is split into k microbatches scanned in sequence; sums are
    accumulated and divided once by the batch's total loss tokens, so the result equals one big
    batch up to float summation order. On more than one device (`uses_manual_data_parallel`)
    each device sums over its own rows and the sums are added over devices."""
    grad_fn = jax.value_and_grad(
        lambda p, f, b, s: loss_sums(graphdef, p, f, b, s, loss_chunk, remat), has_aux=True)
    manual = uses_manual_data_parallel(mesh, manual_data_parallel)
    split_mesh = None if manual else mesh  # per device: its rows are already local

    def sums(params, frozen, batch, nll_scale):
        if grad_accum == 1:
            (_, aux), grads = grad_fn(params, frozen, batch, nll_scale)
        else:
            mbs = _microbatches(batch, grad_accum, split_mesh)

            def body(carry, mb):
                g_acc, a_acc = carry
                (_, a), g = grad_fn(params, frozen, mb, nll_scale)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, a_acc, a)), None

            zeros_g = jax.tree.map(jnp.zeros_like, params)
            zeros_a = {n: jnp.zeros((), jnp.float32) for n in ("sum_nll", "tokens", "bytes",
                                                               "correct")}
            (grads, aux), _ = jax.lax.scan(body, (zeros_g, zeros_a), mbs)
        return grads, aux

    if manual:
        sums = _summed_over_devices(sums, mesh)

    def fn(params, frozen, batch, nll_scale=1.0):
        grads, aux = sums(params, frozen, batch, jnp.asarray(nll_scale, jnp.float32))
        count = jnp.maximum(aux["tokens"], 1.0)
        return jax.tree.map(lambda g: g / count, grads), aux

    return fn


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable,
                    step_cfg: StepConfig | None = None, mesh: Mesh | None = None):
    """state, batch -> (new state, metrics). Pure; jit it (see `jit_train_step`)."""
    step_cfg = step_cfg or StepConfig()
    grads_of = make_grad_fn(graphdef, step_cfg.grad_accum, mesh, step_cfg.loss_chunk,
                            step_cfg.remat, step_cfg.manual_data_parallel)

    def train_step(state: dict, batch: dict):
        params, frozen = state["params"], state["frozen"]
        nll_scale = jnp.float32(1.0)
        if step_cfg.inject_nan_at_step >= 0:
            nll_scale = jnp.where(state["step"] + 1 == step_cfg.inject_nan_at_step,
                                  jnp.float32(jnp.nan), nll_scale)
        grads, aux = grads_of(params, frozen, batch, nll_scale)
        count = jnp.maximum(aux["tokens"], 1.0)
        loss = aux["sum_nll"] / count
        grad_norm = optax.tree.norm(grads)
        # known before the update (see the module docstring)
        ok = state["finite"] & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        param_norm = optax.tree.norm(new_params)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        new = {"step": state["step"] + 1, "params": new_params, "frozen": frozen,
               "opt_state": opt_state, "rng": rng, "finite": state["finite"]}
        if step_cfg.check_finite:
            new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
            new["finite"] = ok & jnp.isfinite(param_norm)
        metrics = {
            "loss": loss,
            "bits_per_byte": aux["sum_nll"] / (LN2 * jnp.maximum(aux["bytes"], 1.0)),
            "accuracy": aux["correct"] / count,
            "grad_norm": grad_norm,
            "param_norm": param_norm,
            "lr": schedule(state["step"]),
            "loss_tokens": aux["tokens"],
            "finite": new["finite"],
        }
        return new, metrics

    return train_step


def update_applied_nonfinite(metrics: dict) -> bool:
    """Whether the step these (host) metrics belong to applied an update that made the
    parameters non-finite (finite loss and grad norm): its state is not the last good one."""
    return bool(math.isfinite(float(metrics["loss"])) and math.isfinite(
        float(metrics["grad_norm"])) and not math.isfinite(float(metrics["param_norm"])))


def make_eval_step(graphdef, loss_chunk: int = 0, mesh: Mesh | None = None,
                   manual_data_parallel: bool = True):
    """state, batch -> the masked sums of `loss_sums` (per device and summed over devices on
    more than one, as the train step)."""
    def sums(params, frozen, batch, nll_scale):
        return loss_sums(graphdef, params, frozen, batch, nll_scale, loss_chunk)

    if uses_manual_data_parallel(mesh, manual_data_parallel):
        sums = _summed_over_devices(sums, mesh)

    def eval_step(state: dict, batch: dict):
        _, aux = sums(state["params"], state["frozen"], batch, jnp.float32(1.0))
        return aux
    return eval_step


class InMesh:
    """A jitted function traced, lowered and called with `mesh` set (`jax.set_mesh`), so that
    code inside can see the mesh: the Pallas kernels then run per device on the batch shards
    (`pallas_kernels._compat.batch_parallel`) instead of being gathered onto every device."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def jit_train_step(train_step, state_sharding: Any, batch_sharding: NamedSharding,
                   mesh: Mesh):
    rep = NamedSharding(mesh, P())
    return InMesh(jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                          out_shardings=(state_sharding, rep), donate_argnums=(0,)), mesh)


def jit_eval_step(eval_step, state_sharding: Any, batch_sharding: NamedSharding, mesh: Mesh):
    rep = NamedSharding(mesh, P())
    return InMesh(jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding),
                          out_shardings=rep), mesh)
