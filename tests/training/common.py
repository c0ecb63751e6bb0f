"""Shared helpers of the training tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.training.tiny_config import get_config

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(Path(__file__).with_name("tiny_config.py"))


def tiny_config(cache_dir: str | os.PathLike | None = None, arg: str = ""):
    c = get_config(arg)
    if cache_dir is not None:
        c.train.compilation_cache_dir = str(cache_dir)
    return c


def synthetic_batch(batch: int = 4, seq_len: int = 32, seed: int = 0) -> dict:
    """A fixed batch in the pipeline's format: byte tokens, two packed documents in row 0,
    a padded tail in the last row (independent of the data pipeline's code)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 256, size=(batch, seq_len + 1)).astype(np.int32)
    seg = np.ones((batch, seq_len + 1), np.int32)
    pos = np.tile(np.arange(seq_len + 1, dtype=np.int32), (batch, 1))
    cut = seq_len // 3
    seg[0, cut:] = 2
    pos[0, cut:] = np.arange(seq_len + 1 - cut)
    seg[-1, seq_len - 5:] = 0  # padding
    tokens[-1, seq_len - 5:] = 0
    pos[-1, seq_len - 5:] = 0
    valid = (seg[:, :-1] != 0) & (seg[:, :-1] == seg[:, 1:])
    return {
        "inputs": tokens[:, :-1].copy(), "targets": tokens[:, 1:].copy(),
        "segment_ids": seg[:, :-1].copy(), "positions": pos[:, :-1].copy(),
        "loss_mask": valid.astype(np.float32),
        "target_bytes": np.where(valid, 1, 0).astype(np.int32),
    }


def cli(args, *, env_extra=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run `python -m mamba3_jax.train ...` from the repository root."""
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "mamba3_jax.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def cli_popen(args, *, env_extra=None, **kw) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "mamba3_jax.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


RESUME_STEPS = 8  # tiny_config: checkpoint every 2 steps, eval every 4 steps, log every step


def resume_args(workdir, cache, *extra) -> list[str]:
    """CLI arguments of the tiny kill/resume runs (all share one compiled program)."""
    return ["--config", TINY_CONFIG, "--workdir", str(workdir),
            f"--config.train.compilation_cache_dir={cache}", f"--config.train.steps={RESUME_STEPS}",
            "--config.data.prefetch=2",  # the real path: a background-prefetching iterator
            *extra]


def curve(workdir, key) -> dict:
    """{step: value} of one metric of a run's metrics.jsonl."""
    from mamba3_jax.training.metrics import read_jsonl

    return {r["step"]: r[key] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if key in r}


CURVE_KEYS = ("train/loss", "train/grad_norm", "train/param_norm", "eval/bits_per_byte")


def assert_same_curves(reference, workdir) -> None:
    """Every logged train and eval metric equal, bit for bit, at every step."""
    for key in CURVE_KEYS:
        want, got = curve(reference, key), curve(workdir, key)
        assert want, key
        assert want == got, key


def wait_for(predicate, proc, what: str, timeout: float = 400) -> None:
    """Poll until `predicate()` while `proc` is still running."""
    import time

    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before {what}:\n" + proc.stdout.read()
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
