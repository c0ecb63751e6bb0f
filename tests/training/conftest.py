import os
import signal

import pytest

from tests.training.common import (
    RESUME_STEPS,
    cli,
    cli_popen,
    curve,
    resume_args,
    wait_for,
)


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    """A persistent XLA compilation cache shared by the training tests (and their subprocesses;
    with pytest-xdist, by all workers): the same tiny programs are compiled once."""
    path = tmp_path_factory.getbasetemp().parent / "jax_cache_training"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def runs(tmp_path_factory, jax_cache):
    """An uninterrupted tiny run (the reference curves of the resume and fault tests) and one
    killed with SIGKILL mid-run, then resumed. Session-scoped: test_resume and test_faults share
    it (both are in the xdist group training_resume, so they run on one worker)."""
    base = tmp_path_factory.mktemp("resume")
    full, killed = base / "full", base / "killed"
    p_full = cli_popen(resume_args(full, jax_cache))
    # slowed down so that the kill lands mid-run, after checkpoint 4 is complete
    p_kill = cli_popen(resume_args(killed, jax_cache, "--config.debug.step_delay=0.4"))
    # orbax renames a step dir into place when complete
    wait_for(lambda: (killed / "checkpoints" / "4").is_dir(), p_kill, "checkpoint 4")
    os.kill(p_kill.pid, signal.SIGKILL)
    p_kill.wait()
    out_full = p_full.communicate(timeout=400)[0]
    assert p_full.returncode == 0, out_full
    killed_steps = max(curve(killed, "train/loss"))
    assert killed_steps < RESUME_STEPS
    resumed = cli(resume_args(killed, jax_cache), timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return {"full": full, "killed": killed, "killed_rc": p_kill.returncode,
            "killed_at": killed_steps, "resume_out": resumed.stdout, "full_out": out_full}
