"""Training with stacked layers (model.scan_layers, remat): a resumed run repeats the
uninterrupted one's losses exactly, and train.profile_steps writes a jax.profiler trace."""

import glob
import gzip
import json
import os

from mamba3_jax.training.metrics import METRICS_FILE, read_jsonl
from mamba3_jax.training.trace_summary import newest_trace, summarize
from mamba3_jax.training.trainer import train
from tests.training.common import tiny_config


def _config(cache, steps):
    c = tiny_config(cache)
    c.model.n_layer = 2
    c.model.scan_layers = True
    c.train.remat = "full"
    c.train.steps = steps
    c.optim.decay_steps = 6  # the same schedule whatever the run length
    c.train.eval_steps = 0
    c.train.checkpoint_every = 2
    return c


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(workdir, METRICS_FILE))
            if "train/loss" in r}


def test_scanned_run_resumes_exactly_and_writes_a_profile(tmp_path, jax_cache):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    assert train(_config(jax_cache, 6), whole)["step"] == 6
    first = _config(jax_cache, 4)
    first.train.profile_steps = "2:4"
    assert train(first, split)["step"] == 4
    traces = glob.glob(os.path.join(split, "profile", "**", "*.xplane.pb"), recursive=True)
    assert traces, os.listdir(split)
    # ... and the summary reads it: the XLA work of the two traced steps, in kinds
    rows = summarize(json.load(gzip.open(newest_trace(os.path.join(split, "profile")))))
    assert rows and sum(r.total_us for r in rows) > 0, rows
    assert sorted(os.listdir(os.path.join(split, "checkpoints")))[-1] == "4"
    assert train(_config(jax_cache, 6), split)["step"] == 6  # resumes from step 4
    a, b = _losses(whole), _losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # bit-identical curve across the resume
