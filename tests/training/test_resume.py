"""Checkpoint/resume: kill -9 mid-run then resume == uninterrupted run; incompatible configs are
refused with a diff; a NaN stops the run after checkpointing the last good state."""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from mamba3_jax.training.checkpoint import IncompatibleCheckpointError
from mamba3_jax.training.metrics import read_jsonl
from mamba3_jax.training.trainer import NonFiniteLossError, Trainer, train
from tests.training.common import TINY_CONFIG, cli, cli_popen, tiny_config

pytestmark = pytest.mark.xdist_group("training_resume")

STEPS = 8  # tiny_config: checkpoint every 2 steps, eval every 4 steps, log every step


def _args(workdir, cache, *extra):
    return ["--config", TINY_CONFIG, "--workdir", str(workdir),
            f"--config.train.compilation_cache_dir={cache}", f"--config.train.steps={STEPS}",
            "--config.data.prefetch=2",  # the real path: a background-prefetching iterator
            *extra]


def _curve(workdir, key):
    return {r["step"]: r[key] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if key in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, jax_cache):
    base = tmp_path_factory.mktemp("resume")
    full, killed = base / "full", base / "killed"
    p_full = cli_popen(_args(full, jax_cache))
    # slowed down so that the kill lands mid-run, after checkpoint 4 is complete
    p_kill = cli_popen(_args(killed, jax_cache, "--config.debug.step_delay=0.4"))
    deadline = time.time() + 400
    target = killed / "checkpoints" / "4"  # orbax renames a step dir into place when complete
    while not target.is_dir():
        assert p_kill.poll() is None, "run finished before it could be killed:\n" + \
            p_kill.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(p_kill.pid, signal.SIGKILL)
    p_kill.wait()
    out_full = p_full.communicate(timeout=400)[0]
    assert p_full.returncode == 0, out_full
    killed_steps = max(_curve(killed, "train/loss"))
    resumed = cli(_args(killed, jax_cache), timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return {"full": full, "killed": killed, "killed_rc": p_kill.returncode,
            "killed_at": killed_steps, "resume_out": resumed.stdout}


def test_kill_and_resume_gives_identical_curves(runs):
    assert runs["killed_rc"] == -signal.SIGKILL
    assert runs["killed_at"] < STEPS
    assert "resumed from step" in runs["resume_out"]
    for key in ("train/loss", "train/grad_norm", "train/param_norm", "eval/bits_per_byte"):
        full, resumed = _curve(runs["full"], key), _curve(runs["killed"], key)
        assert full, key
        assert full == resumed, key  # exact float equality, every step
    assert sorted(_curve(runs["full"], "train/loss")) == list(range(1, STEPS + 1))
    summary = json.load(open(runs["killed"] / "summary.json"))
    assert summary["step"] == STEPS


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


def test_sigterm_checkpoints_and_stops(tmp_path, jax_cache, runs):
    """Preemption: SIGTERM -> checkpoint after the current step, exit code 143."""
    del runs  # only to run after the module's compiled programs are in the cache
    p = cli_popen(_args(tmp_path, jax_cache, "--config.debug.step_delay=0.4",
                        "--config.train.checkpoint_every=100"))
    deadline = time.time() + 400
    while not any(s >= 2 for s in _curve(tmp_path, "train/loss")):
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=400)[0]
    assert p.returncode == 143, out
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints"))
    assert len(steps) == 1 and 2 <= steps[0] < STEPS, (steps, out)
    assert max(_curve(tmp_path, "train/loss")) == steps[0]
