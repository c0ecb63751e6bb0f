"""On 2 forced CPU devices, with the per-device step (data=2, then fsdp=2) and grad
accumulation, a run stopped at a checkpoint and resumed logs exactly the losses, grad norms and
eval losses of an uninterrupted run. A subprocess: the device count is set before jax starts."""

import json
import os
import subprocess
import sys

from tests.training.common import REPO


def test_two_device_run_resumes_exactly(jax_cache):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "tests.training.multidevice_resume_check",
                        jax_cache], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(next(ln for ln in r.stdout.splitlines()
                          if ln.startswith("RESULT "))[len("RESULT "):])
    for layout in ("fsdp1", "fsdp2"):
        got = res[layout]
        assert got["keys"] >= 9 and got["same_keys"], got  # 6 losses, grad norms, 3 evals
        assert got["max_diff"] == 0.0, got  # bit for bit
