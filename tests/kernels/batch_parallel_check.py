"""Run with 2 (forced) devices: the chunked-scan kernels under a mesh run per device on the
batch shards (shard_map) and give the unsharded results; prints RESULT {json}.
Used by test_batch_parallel.py (a subprocess: the device count is fixed when jax starts)."""

import json
import os
import sys

os.environ["MAMBA3_KERNEL_SHARD_MAP"] = "1"  # the kernels' own shard_map is opt-in (chunked_scan)

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from kernel_cases import make_problem, rel  # noqa: E402

from mamba3_jax.training.step import jit_train_step  # noqa: E402
from pallas_kernels import chunked_scan  # noqa: E402
from pallas_kernels._compat import KernelUnsupported  # noqa: E402


def run(inp, state, p):  # compiled kernels when run on 2 GPUs, interpreted on CPU devices
    out, final = chunked_scan(inp, state, chunk_size=16,
                              interpret=jax.default_backend() == "cpu", **p)
    return out, final


def loss(inp, state, p):
    out, final = run(inp, state, p)
    return (out.astype("float32") ** 2).sum() + (final.h ** 2).sum()


def main():
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1), ("data", "fsdp"))
    inp, state, p = make_problem(0, 2, 40, 1, 2, 64, 16, 16, resets=True, groups=1)
    want, want_state = jax.jit(run)(inp, state, p)
    want_g = jax.jit(jax.grad(loss, argnums=(0, 2), allow_int=True))(inp, state, p)
    res = {}
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(run)(inp, state, p))
        res["shard_map_in_jaxpr"] = "shard_map" in jaxpr
        batch = NamedSharding(mesh, P("data"))
        sh_inp = inp._replace(**{f: jax.device_put(getattr(inp, f), batch) for f in
                                 ("q", "k", "x", "angle_inc", "log_decay", "gamma", "eta",
                                  "reset")})
        got, got_state = jax.jit(run)(sh_inp, state, p)
        got_g = jax.jit(jax.grad(loss, argnums=(0, 2), allow_int=True))(sh_inp, state, p)
        res["out_rel"] = rel(got, want)
        res["state_rel"] = max(rel(a, b) for a, b in zip(jax.tree.leaves(got_state),
                                                         jax.tree.leaves(want_state), strict=True))
        res["grad_rel"] = max(rel(a, b) for a, b in zip(jax.tree.leaves(got_g),
                                                        jax.tree.leaves(want_g), strict=True)
                              if a.size and a.dtype != jax.dtypes.float0)
        odd, odd_state, odd_p = make_problem(1, 3, 16, 1, 2, 64, 16, 16, groups=1)
        try:
            run(odd, odd_state, odd_p)
            res["odd_batch"] = "ran"
        except KernelUnsupported as e:
            res["odd_batch"] = str(e)

    seen = {}

    def step(state, batch):  # records the mesh the trainer's jit traces under
        seen["mesh"] = dict(jax.sharding.get_abstract_mesh().shape)
        return state, {"x": batch.sum()}

    rep = NamedSharding(mesh, P())
    jit_train_step(step, rep, NamedSharding(mesh, P("data")), mesh)(
        jax.numpy.zeros(()), jax.numpy.ones((2, 4)))
    res["train_step_mesh"] = seen["mesh"]
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
