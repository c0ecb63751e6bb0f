"""Pure-JAX maths of Mamba-3: functions on arrays, no Flax."""
