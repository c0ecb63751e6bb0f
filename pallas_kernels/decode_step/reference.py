"""The reference the decode-step kernels are tested against, with their contract: one token's
group-level (or per-head) q, k plus per-head biases, x, z and the step's scalars in; the gated
output (B, H, P) float32 and the new state out. It is `mamba3_jax.ops.ssm.ssm_step` (the step
that `ssm_reference` scans over time: ground truth) followed by `gate_output`."""

from __future__ import annotations

from mamba3_jax.ops.mixer import gate_output
from mamba3_jax.ops.ssm import SSMInputs, SSMState, per_head, ssm_step


def reference_step(state: SSMState, q, k, x, z, angle_inc, log_decay, gamma, eta, reset=None, *,
                   D, mimo_x=None, mimo_z=None, mimo_o=None, norm_weight=None, norm_eps=1e-5,
                   q_bias=None, k_bias=None, step=ssm_step):
    """`pallas_triton.decode_step`'s arguments and results, in XLA. `step`: another formulation
    of `ssm_step` with its signature (the benchmarks time them side by side)."""
    one = per_head(SSMInputs(q[:, None], k[:, None], x[:, None], angle_inc[:, None],
                             log_decay[:, None], gamma[:, None], eta[:, None], None,
                             q_bias, k_bias))
    y, new = step(state, one.q[:, 0], one.k[:, 0], x, angle_inc, log_decay, gamma, eta, reset,
                  mimo_x)
    out = gate_output(y[:, None], x[:, None], z[:, None], D, mimo_x, mimo_z, mimo_o,
                      norm_weight, norm_eps)
    return out[:, 0], new
