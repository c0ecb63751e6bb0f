r"""Pretrain a Mamba-3 language model.

    python -m mamba3_jax.train --config configs/tiny_cpu.py --workdir runs/tiny
    python -m mamba3_jax.train --config configs/paper.py:440m_mimo --workdir runs/440m \
        --config.train.steps=1000 --config.mesh.fsdp=8
    python -m mamba3_jax.train --config configs/small_gpu.py:mimo --print_config

Any config field can be overridden with --config.<section>.<key>=<value>; the resolved config is
validated before anything runs. Re-running with the same --workdir resumes from its newest
checkpoint. See docs/training.md.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False,
                                  "Validate and print the resolved config, then exit.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (else auto-detected from "
    "SLURM / TPU / JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Force jax.distributed.initialize() (auto-detected otherwise).")

EXIT_CONFIG, EXIT_NONFINITE, EXIT_CHECKPOINT = 2, 3, 4
EXIT_PREEMPTED = 143  # 128 + SIGTERM (130 for SIGINT): checkpointed and stopped; run again


def _missing_key(dotted: str):
    """(walked prefix, valid keys there) if `dotted` is not a path of the base schema."""
    from mamba3_jax.training.config import FREE_FORM, base_config

    node, walked = base_config(), []
    for part in dotted.split("."):
        if ".".join(walked) in FREE_FORM:
            return None  # free-form source specs: checked by the data code
        if not hasattr(node, "keys") or part not in node:
            valid = sorted(node.keys()) if hasattr(node, "keys") else []
            return ".".join(walked) or "config", valid
        node = node[part]
        walked.append(part)
    return None


def parse_flags(argv):
    """absl flag parsing, with a readable error for a mistyped --config.<key> override."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        for arg in argv[1:]:
            if not arg.startswith("--config."):
                continue
            key = arg.split("=", 1)[0][len("--config."):]
            missing = _missing_key(key)
            if missing:
                where, valid = missing
                sys.stderr.write(f"error: unknown config key {key!r} in {arg!r}; valid keys of "
                                 f"{where}: {', '.join(valid)}\n")
                sys.exit(EXIT_CONFIG)
        sys.stderr.write(f"error: bad config override: {e} (an override only changes a key the "
                         "config file already has; add new source options in the file)\n")
        sys.exit(EXIT_CONFIG)
    except flags.Error as e:
        sys.stderr.write(f"error: {e}\nPass --helpshort for usage.\n")
        sys.exit(EXIT_CONFIG)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mamba3_jax.training.config import ConfigError, config_json, validate
    from mamba3_jax.training.preflight import gpu_xla_flags

    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required (e.g. --config configs/tiny_cpu.py)")
    try:
        validate(config)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_CONFIG
    if _PRINT_CONFIG.value:
        print(config_json(config))
        return 0
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)
    if _gpu_possible():  # read when jax starts its backends (below), not later
        os.environ["XLA_FLAGS"] = gpu_xla_flags(os.environ.get("XLA_FLAGS", ""), config)
    # heavy imports (jax, flax, orbax, grain) only once the config is known to be good
    import jax

    from mamba3_jax.training import mesh as mesh_lib
    from mamba3_jax.training.checkpoint import CorruptCheckpointError, IncompatibleCheckpointError
    from mamba3_jax.training.lock import WorkdirBusyError, WorkdirLock
    from mamba3_jax.training.trainer import DeviceMemoryError, NonFiniteLossError, train

    mesh_lib.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value, force=_DISTRIBUTED.value)
    # one run per workdir, checked before the data is read or anything is compiled
    lock = WorkdirLock(_WORKDIR.value) if jax.process_index() == 0 else None
    try:
        if lock is not None:
            lock.acquire()
        summary = train(config, _WORKDIR.value)
    except (ConfigError, WorkdirBusyError, DeviceMemoryError) as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_CONFIG
    except (IncompatibleCheckpointError, CorruptCheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_CHECKPOINT
    except NonFiniteLossError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_NONFINITE
    finally:
        if lock is not None:
            lock.release()
    if summary.get("preempted"):
        name = summary.get("signal") or "SIGTERM"
        print(f"stopped by {name} at step {summary['step']}: checkpoint saved; run the same "
              "command again to resume")
        return 128 + int(getattr(signal, name))
    ev = summary.get("final_eval") or {}
    if ev:
        print(f"done: step {summary['step']}, eval bits/byte {ev['bits_per_byte']:.4f}, "
              f"wall {summary['wall_time_sec']:.0f}s, workdir {summary['workdir']}")
    else:
        print(f"done: step {summary['step']}, wall {summary['wall_time_sec']:.0f}s, "
              f"workdir {summary['workdir']}")
    return 0


def _gpu_possible() -> bool:
    """A GPU plugin is installed and not excluded by JAX_PLATFORMS. The GPU-only determinism
    flag is set only then: on CPU it would only change the compilation-cache keys."""
    from mamba3_jax.training.preflight import gpu_plugin_installed

    platforms = os.environ.get("JAX_PLATFORMS", "")
    return gpu_plugin_installed() and (not platforms or any(
        p in platforms for p in ("cuda", "gpu", "rocm")))


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
