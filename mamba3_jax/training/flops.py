"""Model FLOPs per trained token and the peak FLOP/s of accelerators (for MFU).

Model FLOPs count the matmuls that the model needs, not what an implementation does
(rematerialisation is not counted), with the usual factor 3 for training (forward + 2 x backward):

    per token = 6 * N_matmul  +  3 * sum over layers of the mixer's forward FLOPs per token

N_matmul is every trainable parameter that takes part in a matmul per token: all parameters
except the embedding lookup table, plus the LM head (the tied embedding counts once, as the head).
The mixer term (`mixer_flops_per_token`), per head:
* Mamba-3 / Mamba-2: the chunked form as implemented (`ops/ssm.py::ssm_chunked`) with chunk C,
  rank R: intra-chunk scores q.k over C keys (2 C R^2 N) and scores @ v (2 C R^2 P), chunk end
  states (2 R P N) and the read-out of the carried state (2 R P N).
* attention: q.k^T and scores @ v over the whole context of `seq_len` keys, 4 seq_len D per
  query head (PaLM's convention: the causal mask's skipped half is counted, as XLA computes it).
* Gated DeltaNet: the chunked form (`ops/delta.py::delta_chunked`): k.k^T and q.k^T in the chunk
  (4 C N), the inverse of the chunk's triangular system by doubling (2 (C'^2 - 1) / 3, C' = C
  rounded up to a power of two) applied to [v, k] (2 C (P + N)), scores @ writes (2 C P), and
  three products with the carried state (6 P N).
"""

from __future__ import annotations

from typing import Optional

from mamba3_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device (no sparsity), matched against `device.device_kind`.
# The first entry whose key occurs in the (lower-cased) device kind wins: more specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h800", 989e12),
    ("b200", 2250e12),
    ("gb200", 2500e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("a10g", 70e12),
    ("v100", 125e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("tpu7x", 2307e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one device, or None when unknown (e.g. CPUs)."""
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matmul per token (see the module docstring)."""
    embed = cfg.vocab_size * cfg.d_model
    n = cfg.num_params()
    # tied: the table is the head (counted once); untied: drop the lookup table, keep the head
    return n if cfg.tie_embeddings else n - embed


def ssm_flops_per_token(cfg: ModelConfig) -> int:
    """Forward FLOPs of one layer's chunked SSM per token (all heads)."""
    C, R = cfg.resolved_chunk_size, cfg.mimo_rank
    N, P, H = cfg.d_state, cfg.headdim, cfg.nheads
    per_head = 2 * C * R * R * (N + P) + 4 * R * P * N
    return H * per_head


def mixer_flops_per_token(cfg: ModelConfig, kind: str, seq_len: Optional[int] = None) -> int:
    """Forward FLOPs per token of one mixer of `kind` beyond its projections (all heads);
    attention needs the training context `seq_len`."""
    if kind == "attention":
        if not seq_len:
            raise ValueError("attention FLOPs depend on the context: pass seq_len")
        return 4 * seq_len * cfg.resolved_attn_heads * cfg.headdim
    if kind == "gated_deltanet":
        C, N, P = cfg.resolved_chunk_size, cfg.d_state, cfg.headdim
        n = 1 << (C - 1).bit_length()  # ops/delta.py::unit_lower_inverse pads to this
        inverse = 2 * (n * n - 1) // 3
        return cfg.nheads * (4 * C * N + inverse + 2 * C * (P + N) + 2 * C * P + 6 * P * N)
    return ssm_flops_per_token(cfg)


def train_flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None) -> int:
    """Training FLOPs per token; `seq_len` (the training context) is needed when the model
    has attention layers."""
    mixers = sum(mixer_flops_per_token(cfg, cfg.layer_mixer(i), seq_len)
                 for i in range(cfg.n_layer))
    return 6 * matmul_params(cfg) + 3 * mixers


def mfu(tokens_per_sec: float, cfg: ModelConfig, peak_per_device: Optional[float],
        n_devices: int, seq_len: Optional[int] = None) -> Optional[float]:
    if not peak_per_device:
        return None
    return (tokens_per_sec * train_flops_per_token(cfg, seq_len)
            / (peak_per_device * n_devices))
