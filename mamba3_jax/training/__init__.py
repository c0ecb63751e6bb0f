"""Pretraining framework: config, optimizer, sharded train step, checkpoints, metrics, loop.

Entry points: `python -m mamba3_jax.train --config configs/tiny_cpu.py --workdir runs/x`
(see docs/training.md) or `mamba3_jax.training.train(config, workdir)`.
Names are imported lazily, so that config handling does not import jax.
"""

import importlib

_EXPORTS = {
    "ConfigError": "config", "base_config": "config", "validate": "config",
    "NonFiniteLossError": "trainer", "Trainer": "trainer", "train": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"mamba3_jax.training.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'mamba3_jax.training' has no attribute {name!r}")
