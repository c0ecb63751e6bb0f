"""Exact resume on the GPU: with train.deterministic (the default), a run killed with SIGKILL
and resumed repeats an uninterrupted run bit for bit, on a model large enough that XLA's GPU
reductions and the embedding's scatter-add gradient take the paths that are otherwise
nondeterministic, with the scan backend the GPU really uses (auto: the Pallas kernel).
Skipped where jax sees no GPU; the CPU guarantee is test_resume.py's."""

import os
import signal

import pytest

from tests.training.common import (
    assert_same_curves,
    cli,
    cli_popen,
    curve,
    resume_args,
    wait_for,
)

pytestmark = pytest.mark.xdist_group("training_resume")

GPU_MODEL = ("--config.model.d_model=256", "--config.model.n_layer=2",
             "--config.model.d_state=64", "--config.model.headdim=64",
             "--config.model.chunk_size=64", "--config.model.d_mlp=512",
             "--config.model.scan_backend=auto", "--config.data.seq_len=256",
             "--config.data.batch_size=16")
GPU_ENV = {"JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


@pytest.fixture(scope="module")
def gpu():
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (jax sees none)")


def test_kill_and_resume_on_gpu_is_bit_exact(gpu, tmp_path, jax_cache):
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = cli(resume_args(full, jax_cache, *GPU_MODEL), env_extra=GPU_ENV, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deterministic" not in r.stderr  # no warning that the XLA flag is missing
    p = cli_popen(resume_args(killed, jax_cache, *GPU_MODEL, "--config.debug.step_delay=0.5"),
                  env_extra=GPU_ENV)
    wait_for(lambda: (killed / "checkpoints" / "4").is_dir(), p, "checkpoint 4", timeout=600)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert max(curve(killed, "train/loss")) < 8
    r = cli(resume_args(killed, jax_cache, *GPU_MODEL), env_extra=GPU_ENV, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from step" in r.stdout
    assert_same_curves(full, killed)
