"""The sharded train step equals the single-device step: 4 forced host devices (a 2 x 2 data x
fsdp mesh, 2 microbatches) and 2 devices (pure data per device with and without microbatches,
pure data partitioned by XLA, pure fsdp), the layouts a 2-GPU machine runs.
Runs in a subprocess because the device count must be set before jax initialises."""

import json
import os
import subprocess
import sys

import pytest

from mamba3_jax.training.config import ConfigError
from mamba3_jax.training.mesh import leaf_spec, mesh_shape
from tests.training.common import REPO


# the 2-device layouts in two processes, so that two test workers share them (one took 95 s)
@pytest.mark.parametrize("devices,layouts", [
    (4, {"dp2_fsdp2_accum2": {"data": 2, "fsdp": 2}}),
    (2, {"dp2": {"data": 2, "fsdp": 1}, "dp2_accum2": {"data": 2, "fsdp": 1},
         "dp2_xla": {"data": 2, "fsdp": 1}}),
    (2, {"fsdp2_accum2": {"data": 1, "fsdp": 2}, "fsdp2_scan": {"data": 1, "fsdp": 2}}),
])
def test_sharded_step_equals_single_device(jax_cache, devices, layouts):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "tests.training.sharded_check", jax_cache,
                        ",".join(layouts)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    assert res["single_mesh"] == {"data": 1, "fsdp": 1}
    assert len(res["devices"]) == devices
    for name, mesh in layouts.items():
        got = res[name]
        assert got["mesh"] == mesh
        if mesh["fsdp"] > 1:
            assert got["sharded_leaves"] >= got["n_leaves"] // 2, got  # params really sharded
        per_device = not name.endswith("_xla")  # shard_map + psum
        assert got["per_device"] == per_device and got["manual_in_hlo"] == per_device, got
        assert got["grad_err_rel"] < 1e-5, got
        assert got["metric_err_rel"] < 1e-5, got
        assert got["eval_err_rel"] < 1e-5, got  # the eval step's sums too


def test_leaf_spec_picks_largest_divisible_axis():
    assert tuple(leaf_spec((256, 64), 4, 0)) == ("fsdp", None)
    assert tuple(leaf_spec((6, 64), 4, 0)) == (None, "fsdp")
    assert tuple(leaf_spec((3, 5), 4, 0)) == ()
    assert tuple(leaf_spec((256, 64), 1, 0)) == ()
    assert tuple(leaf_spec((64,), 4, 1024)) == ()  # small: replicated
    # stacked layers: the layer axis (0) is never sharded, even when it is the largest
    assert tuple(leaf_spec((512, 256, 64), 4, 0, stacked=True)) == (None, "fsdp", None)
    assert tuple(leaf_spec((8, 3, 5), 4, 0, stacked=True)) == (None,)
    assert tuple(leaf_spec((24, 64), 4, 1024, stacked=True)) == (None,)  # one layer is small


def test_state_shardings_leave_the_layer_axis_whole():
    import jax
    from jax.sharding import AbstractMesh

    from mamba3_jax.training.mesh import state_shardings
    mesh = AbstractMesh((1, 4), ("data", "fsdp"))  # specs only: no devices needed
    shapes = {"params": {"blocks": {"w": jax.ShapeDtypeStruct((64, 16, 8), "float32")},
                         "embed": jax.ShapeDtypeStruct((64, 16, 8), "float32")}}
    got = jax.tree.map(lambda s: tuple(s.spec), state_shardings(shapes, mesh, 0),
                       is_leaf=lambda x: hasattr(x, "spec"))
    assert got["params"]["blocks"]["w"] == (None, "fsdp", None)
    assert got["params"]["embed"] == ("fsdp", None, None)


def test_mesh_shape_errors():
    class M:
        data, fsdp = -1, 3
    with pytest.raises(ConfigError, match="does not divide"):
        mesh_shape(M, 4)
    M.data, M.fsdp = 2, 1
    with pytest.raises(ConfigError, match="must equal the number of devices"):
        mesh_shape(M, 4)
    M.data, M.fsdp = -1, 2
    assert mesh_shape(M, 8) == (4, 2)
