"""Under a mesh context the kernels run per device on batch shards (`jax.shard_map`).

Mosaic kernels cannot be partitioned by XLA, so a data-parallel jit on a multi-chip TPU needs
this. Checked on a 2-device CPU mesh (a subprocess, since the device count is fixed at jax
start-up): gradients through the sharded kernels equal the reference's.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from tests.helpers import rel_err
    from tests.kernels_tpu.tpu_cases import _loss, grad_reference, problem
    from pallas_kernels.tpu import ssm_rows_tpu

    assert jax.device_count() == 2
    inp, st, mx = problem(1, L=24, R=2, reset_prob=0.1)
    cot = jnp.asarray(np.random.default_rng(9).standard_normal((2, 24, 2, 3, 4)), jnp.float32)
    diff = inp._replace(reset=None)

    def kernel(i, s, m):
        return ssm_rows_tpu(i, s, mimo_x=m, chunk_size=8, interpret=True)

    def grads(i, s, m):
        return jax.grad(lambda *a: _loss(kernel, a[0], inp.reset, a[1], a[2], cot),
                        argnums=(0, 1, 2))(i, s, m)

    mesh = jax.make_mesh((2,), ("data",))
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(grads)(diff, st, mx))
        g = jax.jit(grads)(diff, st, mx)
    assert "shard_map" in jaxpr
    g_ref = grad_reference(diff, inp.reset, st, mx, cot)
    err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref),
                                             strict=True))
    assert err < 5e-5, err
    print("OK", err)
""")


def test_kernels_shard_over_the_batch_under_a_mesh():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.strip().startswith("OK")
