"""One/two train steps on 1 device vs. on all devices with data x fsdp meshes; prints one JSON
line (RESULT ...) with the measured differences.

CPU (test_sharding.py): a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4.
Real devices, e.g. a 2-GPU machine (docs/training.md, "Checking sharding on real devices"):
    PYTHONPATH=. python -m tests.training.sharded_check /tmp/jax_cache
"""

import json
import sys

import jax
import numpy as np

from mamba3_jax.training.step import make_grad_fn, uses_manual_data_parallel
from mamba3_jax.training.trainer import Trainer
from tests.training.common import synthetic_batch, tiny_config


def run(cache, devices, **overrides):
    c = tiny_config(cache)
    c.data.batch_size = 8
    c.mesh.fsdp_min_size = 0
    for k, v in overrides.items():
        sec, key = k.split("__")
        c[sec][key] = v
    tr = Trainer(c, "/nonexistent-unused", devices=devices)
    state = tr.fresh_state()
    b1, b2 = tr.put_batch(synthetic_batch(8, 32, 1)), tr.put_batch(synthetic_batch(8, 32, 2))
    grads, _ = jax.jit(make_grad_fn(tr.graphdef, c.train.grad_accum, tr.mesh,
                                    manual_data_parallel=c.mesh.manual_data_parallel))(
        state["params"], state["frozen"], b1)
    grads = jax.device_get(grads)
    if "blocks" in grads:  # scan_layers: compare per layer with the unrolled single device
        stacked = grads.pop("blocks")
        grads["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked)
                           for i in range(c.model.n_layer)}
    sharded = sum(1 for s in jax.tree.leaves(
        jax.tree.map(lambda x: "fsdp" in str(x.sharding.spec), state["params"])) if s)
    evals = {k: float(v) for k, v in jax.device_get(tr.eval_step(state, b1)).items()}
    metrics = []
    for b in (b1, b2):
        state, m = tr.train_step(state, b)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    lowered = tr.train_step.lower(state, b1).as_text()
    return {"grads": grads, "metrics": metrics, "evals": evals, "sharded_leaves": sharded,
            "per_device": uses_manual_data_parallel(tr.mesh, c.mesh.manual_data_parallel),
            "manual_in_hlo": "manual" in lowered.lower(),
            "n_leaves": len(jax.tree.leaves(state["params"])), "mesh": dict(tr.mesh.shape)}


def layouts(n: int) -> dict:
    """Sharded layouts to compare with one device: with 4k devices a single one that exercises
    data parallelism, fsdp and microbatching together; otherwise pure data and pure fsdp."""
    if n % 4 == 0:
        return {f"dp2_fsdp{n // 2}_accum2": dict(mesh__data=2, mesh__fsdp=n // 2,
                                                 train__grad_accum=2)}
    return {f"dp{n}": dict(mesh__data=n, mesh__fsdp=1),  # per device (shard_map), then psum
            f"dp{n}_accum2": dict(mesh__data=n, mesh__fsdp=1, train__grad_accum=2),
            f"dp{n}_xla": dict(mesh__data=n, mesh__fsdp=1, mesh__manual_data_parallel=False),
            f"fsdp{n}_accum2": dict(mesh__data=1, mesh__fsdp=n, train__grad_accum=2),
            # stacked layers (scan): fsdp must leave the layer axis whole, same numbers
            f"fsdp{n}_scan": dict(mesh__data=1, mesh__fsdp=n, model__scan_layers=True,
                                  train__remat="full")}


def main(cache, only: str = ""):
    """only: a comma list of layout names (default every layout of the device count)."""
    n = jax.device_count()
    assert n >= 2 and 8 % n == 0, f"needs 2, 4 or 8 devices (batch 8), got {jax.devices()}"
    single = run(cache, jax.devices()[:1])
    out = {"single_mesh": single["mesh"], "devices": [str(d) for d in jax.devices()]}
    chosen = layouts(n)
    if only:
        chosen = {name: chosen[name] for name in only.split(",")}
    for name, kw in chosen.items():
        r = run(cache, None, **kw)
        scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(single["grads"]))
        grad_err = max(float(np.abs(a - b).max()) for a, b in
                       zip(jax.tree.leaves(single["grads"]), jax.tree.leaves(r["grads"]),
                           strict=True))
        metric_err = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12)
                         for a, b in zip(single["metrics"], r["metrics"], strict=True)
                         for k in ("loss", "grad_norm", "param_norm", "bits_per_byte"))
        eval_err = max(abs(single["evals"][k] - r["evals"][k]) / max(abs(single["evals"][k]),
                                                                     1e-12)
                       for k in single["evals"])
        out[name] = {"mesh": r["mesh"], "grad_err_rel": grad_err / scale,
                     "eval_err_rel": eval_err,
                     "metric_err_rel": metric_err, "sharded_leaves": r["sharded_leaves"],
                     "n_leaves": r["n_leaves"], "per_device": r["per_device"],
                     "manual_in_hlo": r["manual_in_hlo"]}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
