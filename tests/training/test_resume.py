"""Checkpoint/resume: kill -9 mid-run then resume == uninterrupted run; incompatible configs are
refused with a diff; a NaN stops the run after checkpointing the last good state."""

import json
import re
import signal

import jax
import numpy as np
import pytest

from mamba3_jax.training.checkpoint import IncompatibleCheckpointError
from mamba3_jax.training.metrics import read_jsonl
from mamba3_jax.training.trainer import NonFiniteLossError, Trainer, train
from tests.training.common import (
    RESUME_STEPS,
    assert_same_curves,
    cli,
    curve,
    resume_args,
    tiny_config,
)

pytestmark = pytest.mark.xdist_group("training_resume")

STEPS = RESUME_STEPS
_args, _curve = resume_args, curve


def test_kill_and_resume_gives_identical_curves(runs):
    assert runs["killed_rc"] == -signal.SIGKILL
    assert runs["killed_at"] < STEPS
    assert "resumed from step" in runs["resume_out"]
    assert_same_curves(runs["full"], runs["killed"])  # exact float equality, every step
    assert sorted(_curve(runs["full"], "train/loss")) == list(range(1, STEPS + 1))
    summary = json.load(open(runs["killed"] / "summary.json"))
    assert summary["step"] == STEPS
    # tiny_config sets train.progress=False: no progress bar lines, even when not on a terminal
    assert not re.search(r"\[[#.]{20}\] \d+/", runs["full_out"] + runs["resume_out"])
    assert "eval step 8:" in runs["full_out"]


def test_restore_into_incompatible_config_lists_differences(runs, jax_cache):
    c = tiny_config(jax_cache)
    c.model.d_state = 32
    c.optim.peak_lr = 0.5
    c.train.steps = 99  # allowed to differ
    with pytest.raises(IncompatibleCheckpointError) as e:
        Trainer(c, str(runs["killed"])).init_or_restore()
    msg = str(e.value)
    assert "model.d_state: checkpoint=16 current=32" in msg
    assert "optim.peak_lr: checkpoint=0.01 current=0.5" in msg
    assert "train.steps" not in msg
    # forcing past the config check still fails on the shapes, with a clear error
    c.train.allow_config_change = True
    with pytest.raises(IncompatibleCheckpointError, match="shapes or structure differ") as e:
        Trainer(c, str(runs["killed"])).init_or_restore()
    assert "params.layers.0.mixer.B_norm: checkpoint (16,) float32, current (32,)" in str(e.value)


def test_cli_incompatible_config_exit_code(runs, jax_cache):
    r = cli(_args(runs["killed"], jax_cache, "--config.model.n_layer=2"))
    assert r.returncode == 4, r.stdout + r.stderr
    assert "model.n_layer: checkpoint=1 current=2" in r.stderr


def test_nan_stops_with_checkpoint_of_last_good_state(tmp_path, jax_cache):
    c = tiny_config(jax_cache)
    c.debug.inject_nan_at_step = 3
    c.train.checkpoint_every = 0
    c.train.eval_steps = 0
    with pytest.raises(NonFiniteLossError) as e:
        train(c, str(tmp_path))
    err = e.value
    assert err.step == 3
    assert err.checkpoint == str(tmp_path / "checkpoints" / "2")
    assert "step 3" in str(err) and str(err.checkpoint) in str(err)
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert records[-1]["step"] == 3 and records[-1]["train/nonfinite"] == 1.0
    # the checkpoint holds the state after step 2, finite, with the data position of step 2
    c.debug.inject_nan_at_step = -1
    tr = Trainer(c, str(tmp_path))
    it = iter(__import__("mamba3_jax.training.data", fromlist=["x"]).train_dataset(c, tr.tokenizer))
    state, start, restored = tr.init_or_restore(it)
    assert restored and start == 2 and bool(state["finite"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))
    it.close()


def test_update_that_makes_params_nonfinite_stops_at_the_last_good_checkpoint(tmp_path,
                                                                              jax_cache):
    """Finite loss and gradients, but an update that overflows the parameters (a run resumed
    from its step-1 checkpoint with peak LR 1e38): the guard, decided before the update, lets it
    through; `finite` turns False on the new param norm, the run stops, and the error names the
    last checkpoint before it, not the device's state (a fresh run doing so at its first step
    has none to name)."""
    from mamba3_jax.training.step import update_applied_nonfinite

    c = tiny_config(jax_cache)
    c.train.steps, c.train.eval_steps, c.optim.warmup_steps = 1, 0, 1
    train(c, str(tmp_path))  # the good checkpoint: step 1
    c.train.steps, c.optim.peak_lr, c.optim.end_lr = 3, 1e38, 0.0
    c.train.allow_config_change = True
    with pytest.raises(NonFiniteLossError) as e:
        train(c, str(tmp_path))
    err = e.value
    assert err.step == 2 and err.checkpoint == str(tmp_path / "checkpoints" / "1")
    assert "made the parameters non-finite; the last good checkpoint is step 1" in str(err)
    rec = read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]
    assert rec["step"] == 2 and rec["train/nonfinite"] == 1.0
    with pytest.raises(NonFiniteLossError, match="no checkpoint holds a good state"):
        train(c, str(tmp_path / "fresh"))
    assert update_applied_nonfinite({"loss": 1.0, "grad_norm": 2.0, "param_norm": float("inf")})
    assert not update_applied_nonfinite({"loss": float("nan"), "grad_norm": 2.0,
                                         "param_norm": float("nan")})
