"""Device mesh (`data` x `fsdp`), sharding rules and multi-host start-up.

* Batches are split along ("data", "fsdp") on their first axis.
* Parameters and optimizer state are sharded along "fsdp" on their largest axis divisible by the
  fsdp size (leaves smaller than `fsdp_min_size` elements, or with no divisible axis, are
  replicated). The optimizer moments get the same rule, so they follow their parameter.
* With fsdp = 1 this is plain data parallelism (everything replicated, batch split).
* Stacked layers (`model.scan_layers`, leaves under `blocks`): the rule applies to one layer's
  shape; the leading layer axis is never sharded, so each scan step gathers one layer's slice.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mamba3_jax.model import STACKED
from mamba3_jax.training.config import ConfigError

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None, force: bool = False) -> bool:
    """Call `jax.distributed.initialize` when a multi-process launch is detected.

    Explicit arguments win; otherwise jax auto-detects SLURM, Open MPI and TPU pod slices. A plain
    single-process run (no flags, no SLURM_NTASKS > 1, no JAX_COORDINATOR_ADDRESS) is left alone.
    """
    if jax.distributed.is_initialized():  # e.g. by train.py before the Trainer asks again
        return True
    env = os.environ
    detected = (
        force or coordinator_address is not None
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
    )
    if not detected:
        return False
    kwargs = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    elif "JAX_COORDINATOR_ADDRESS" in env:
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    elif "JAX_NUM_PROCESSES" in env:
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if process_id is not None:
        kwargs["process_id"] = process_id
    elif "JAX_PROCESS_ID" in env:
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    if "JAX_LOCAL_DEVICE_IDS" in env:  # one process per GPU: "0", "1", ... (or "0,1")
        kwargs["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int]:
    fsdp = int(mesh_cfg.fsdp)
    data = int(mesh_cfg.data)
    if data == -1:
        if n_devices % fsdp:
            raise ConfigError(f"mesh.fsdp={fsdp} does not divide the {n_devices} devices")
        data = n_devices // fsdp
    if data * fsdp != n_devices:
        raise ConfigError(f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp} must equal "
                          f"the number of devices ({n_devices}); use mesh.data=-1 to fill")
    return data, fsdp


def make_mesh(mesh_cfg, devices: Optional[Sequence] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils
        if len(devices) == jax.device_count():
            grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
        else:
            grid = np.asarray(devices).reshape(data, fsdp)
    except Exception:  # odd topologies: fall back to the given order
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES)


def check_batch(config, mesh: Mesh) -> None:
    """Batch sizes that the mesh / hosts / microbatches can split evenly."""
    n = mesh.devices.size
    b, k = int(config.data.batch_size), int(config.train.grad_accum)
    errors = []
    if (b // k) % n:
        errors.append(f"the microbatch data.batch_size / train.grad_accum = {b} / {k} = {b // k} "
                      f"must be divisible by the {n} devices of the mesh (data x fsdp)")
    if b % jax.process_count():
        errors.append(f"data.batch_size={b} must be divisible by the {jax.process_count()} hosts")
    eb = int(config.data.eval_batch_size or b)
    if eb % n:
        errors.append(f"the eval batch ({eb}) must be divisible by the {n} devices")
    if errors:
        raise ConfigError("batch does not fit the devices:\n  " + "\n  ".join(errors))


def leaf_spec(shape: Sequence[int], fsdp: int, min_size: int = 1024,
              stacked: bool = False) -> P:
    """Shard the largest axis divisible by `fsdp` (ties: the first); else replicate.
    stacked: axis 0 is the layer axis, left whole; the rule applies to the rest."""
    if stacked and shape:
        return P(None, *leaf_spec(shape[1:], fsdp, min_size))
    if fsdp <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % fsdp == 0 and (best is None or d > shape[best]):
            best = i
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def _is_stacked(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == STACKED for k in path)


def state_shardings(abstract_state, mesh: Mesh, min_size: int = 1024):
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, leaf_spec(getattr(x, "shape", ()), fsdp, min_size,
                                                      _is_stacked(path))),
        abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_batch_to_global(batch: dict, sharding: NamedSharding) -> dict:
    """This host's numpy rows -> global jax arrays split along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
