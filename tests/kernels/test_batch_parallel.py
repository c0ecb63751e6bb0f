"""Under a mesh (as the trainer sets one), the Pallas chunked scan runs per device on its batch
shard (shard_map) instead of being gathered onto every device, with the unsharded results,
forward and gradients; a batch the devices do not divide is a clear KernelUnsupported ('auto'
then falls back to XLA). Two forced CPU devices, interpret mode, in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_kernels_run_per_batch_shard_under_a_mesh():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(REPO / "tests" / "kernels" /
                                            "batch_parallel_check.py")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(next(ln for ln in r.stdout.splitlines()
                          if ln.startswith("RESULT "))[len("RESULT "):])
    assert res["shard_map_in_jaxpr"]
    assert res["out_rel"] < 1e-6 and res["state_rel"] < 1e-6, res
    assert res["grad_rel"] < 1e-5, res
    assert "not divisible by the 2 devices" in res["odd_batch"], res
    assert res["train_step_mesh"] == {"data": 2, "fsdp": 1}
