"""Run with 2 (forced) devices: a run on the per-device step (data=2, and fsdp=2), stopped at a
checkpoint and resumed, logs the uninterrupted run's losses and eval numbers exactly; prints
RESULT {json}. Used by test_multidevice_resume.py (the device count is fixed when jax starts)."""

import json
import os
import sys
import tempfile

import jax

from mamba3_jax.training.metrics import METRICS_FILE, read_jsonl
from mamba3_jax.training.trainer import train
from tests.training.common import tiny_config


def config(cache, steps, fsdp):
    c = tiny_config(cache)
    c.model.n_layer = 2
    c.train.steps = steps
    c.optim.decay_steps = 6  # the same schedule whatever the run length
    c.train.eval_every = 2
    c.train.eval_steps = 1
    c.train.checkpoint_every = 2
    c.train.grad_accum = 2
    c.mesh.fsdp = fsdp
    c.mesh.fsdp_min_size = 0
    return c


def curve(workdir):
    return {f"{r['step']}:{k}": v for r in read_jsonl(os.path.join(workdir, METRICS_FILE))
            for k, v in r.items() if k in ("train/loss", "train/grad_norm", "eval/loss")}


def main(cache):
    assert jax.device_count() == 2, jax.devices()
    out = {}
    for fsdp in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            whole, split = os.path.join(tmp, "whole"), os.path.join(tmp, "split")
            train(config(cache, 6, fsdp), whole)
            train(config(cache, 4, fsdp), split)
            train(config(cache, 6, fsdp), split)  # resumes from step 4
            a, b = curve(whole), curve(split)
            out[f"fsdp{fsdp}"] = {"keys": len(a), "same_keys": sorted(a) == sorted(b),
                                  "max_diff": max(abs(a[k] - b[k]) for k in a)}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
