"""Multi-process start-up: jax.distributed.initialize is called exactly when the environment
(or a flag) says the run has several processes, with the coordinator, count and index given."""

import jax

from mamba3_jax.training import mesh as mesh_lib

ENV_KEYS = ("SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "JAX_LOCAL_DEVICE_IDS", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")


def _patch(monkeypatch, env):
    calls = []
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    return calls


def test_single_process_is_left_alone(monkeypatch):
    calls = _patch(monkeypatch, {"SLURM_NTASKS": "1"})
    assert mesh_lib.maybe_initialize_distributed() is False and calls == []


def test_env_launch_initialises_with_its_values(monkeypatch):
    calls = _patch(monkeypatch, {"JAX_COORDINATOR_ADDRESS": "host0:1234",
                                 "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                                 "JAX_LOCAL_DEVICE_IDS": "1"})
    assert mesh_lib.maybe_initialize_distributed() is True
    assert calls == [{"coordinator_address": "host0:1234", "num_processes": 2, "process_id": 1,
                      "local_device_ids": [1]}]


def test_slurm_lets_jax_find_the_coordinator_and_flags_win(monkeypatch):
    calls = _patch(monkeypatch, {"SLURM_NTASKS": "4"})
    assert mesh_lib.maybe_initialize_distributed() is True and calls == [{}]
    calls = _patch(monkeypatch, {})
    mesh_lib.maybe_initialize_distributed("h:1", 3, 2)
    assert calls == [{"coordinator_address": "h:1", "num_processes": 3, "process_id": 2}]


def test_already_initialised_is_not_initialised_again(monkeypatch):
    calls = _patch(monkeypatch, {"SLURM_NTASKS": "4"})
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert mesh_lib.maybe_initialize_distributed() is True and calls == []
