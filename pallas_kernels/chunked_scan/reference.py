"""The reference the chunked-scan kernels are tested against: the decode step scanned over time
(`mamba3_jax.ops.ssm.ssm_reference`, ground truth) and the gated output, with the kernels'
contract (SSM inputs and state in; gated output (B, L, H, P) float32 and final state out)."""

from __future__ import annotations

from mamba3_jax.ops.mixer import gate_output
from mamba3_jax.ops.ssm import per_head, ssm_reference


def reference(inp, state, *, z, D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None,
              chunk_size=64, norm_eps=1e-5):
    """Sequential XLA form + gate: the tests' oracle and the step backends' fallback."""
    y, final = ssm_reference(per_head(inp), state, mimo_x)
    return gate_output(y, inp.x, z, D, mimo_x, mimo_z, mimo_o, norm_weight, norm_eps), final
