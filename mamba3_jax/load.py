"""Load a trained run for inference: its config, its tokenizer and one checkpoint's weights.

    run = load_model("runs/tiny")            # newest checkpoint; step=N picks another
    run.model, run.tokenizer, run.config, run.step

A run directory is what `python -m mamba3_jax.train --workdir` writes:
`checkpoints/<step>/{state, config, data}` (see mamba3_jax/training/checkpoint.py). Only the
model's parameters and frozen buffers are read from `state` (not the optimizer state), onto the
first device. `read_run` does the cheap part (paths, step, config, tokenizer) so a command line
can check its arguments before any weights are read.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mamba3_jax.config import ModelConfig
from mamba3_jax.data.tokenizers import Tokenizer, get_tokenizer
from mamba3_jax.model import Mamba3LM
from mamba3_jax.training.config import model_config


class RunInfo(NamedTuple):
    workdir: str
    step: int
    config: dict  # the training config the checkpoint was written with
    tokenizer: Tokenizer
    model_config: ModelConfig


class TrainedRun(NamedTuple):
    model: Mamba3LM
    tokenizer: Tokenizer
    config: dict
    step: int


@contextlib.contextmanager
def _manager(ckpt_dir: str, handlers: dict):
    options = ocp.CheckpointManagerOptions(create=False)  # reading must not create directories
    mgr = ocp.CheckpointManager(ckpt_dir, options=options, item_handlers=handlers)
    try:
        yield mgr
    finally:
        mgr.close()


def _restore(ckpt_dir: str, step: int, handlers: dict, **args) -> dict:
    with _manager(ckpt_dir, handlers) as mgr:
        return mgr.restore(step, args=ocp.args.Composite(**args))


def checkpoint_steps(workdir: str) -> list[int]:
    """The complete checkpoints of a run, oldest first; FileNotFoundError if there are none."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"run directory {workdir!r} does not exist")
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = []
    if os.path.isdir(ckpt_dir):
        with _manager(ckpt_dir, {}) as mgr:
            steps = sorted(mgr.all_steps())
    if not steps:
        raise FileNotFoundError(f"{workdir!r} has no checkpoint (expected {ckpt_dir}/<step>/; "
                                "train with python -m mamba3_jax.train --workdir first)")
    return steps


def _saved_config(workdir: str, step: int) -> dict:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.exists(os.path.join(ckpt_dir, str(step), "config")):
        out = _restore(ckpt_dir, step, {"config": ocp.JsonCheckpointHandler()},
                       config=ocp.args.JsonRestore())
        return dict(out["config"])
    path = os.path.join(workdir, "config.json")  # older checkpoints: the run's config file
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {step} of {workdir!r} has no stored config and "
                                f"there is no {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_run(workdir: str, step: Optional[int] = None) -> RunInfo:
    """The step (newest when None), config, tokenizer and model config of a run; reads no
    weights. FileNotFoundError / ValueError with one line when something is missing."""
    workdir = os.path.abspath(workdir)
    steps = checkpoint_steps(workdir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{workdir!r} has no checkpoint at step {step}; it has steps "
                                f"{', '.join(map(str, steps))}")
    config = _saved_config(workdir, step)
    tokenizer = get_tokenizer(config["data"]["tokenizer"])
    return RunInfo(workdir, step, config, tokenizer, model_config(config, tokenizer.vocab_size))


def _abstract_weights(cfg: ModelConfig) -> tuple[Any, dict]:
    """(graphdef, {"params", "frozen"} as ShapeDtypeStructs on the first device), the part of
    the train state (mamba3_jax/training/step.py) a model needs."""
    model = nnx.eval_shape(lambda: Mamba3LM(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = {"params": nnx.to_pure_dict(params), "frozen": nnx.to_pure_dict(rest)}
    return graphdef, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def load_model(workdir: str, step: Optional[int] = None) -> TrainedRun:
    """The model of a trained run at `step` (the newest checkpoint when None), with the run's
    tokenizer and training config."""
    info = read_run(workdir, step)
    graphdef, target = _abstract_weights(info.model_config)
    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)  # skip the optimizer state
    try:
        state = _restore(os.path.join(info.workdir, "checkpoints"), info.step,
                         {"state": ocp.PyTreeCheckpointHandler()}, state=restore)["state"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot load checkpoint {info.step} of {info.workdir!r} into the "
                         f"model its config describes: {e}") from e
    model = nnx.merge(graphdef, state["params"], state["frozen"])
    return TrainedRun(model, info.tokenizer, info.config, info.step)
