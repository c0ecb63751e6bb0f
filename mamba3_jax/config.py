"""Model configuration: one frozen dataclass, validated on construction.

Every ablation switch of the paper is a field here, so experiments change behaviour by config only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

A_ACTIVATIONS = ("softplus", "heavy_tail")
DISCRETIZATIONS = ("trapezoid", "trapezoid_half", "euler")
ROTATIONS = ("data_dependent", "fixed", "none")
MIXERS = ("mamba3", "mamba2", "attention", "gated_deltanet")
LAYER_LETTERS = {"M": "mamba3", "A": "attention"}  # layer_pattern letters -> mixer
SCAN_BACKENDS = ("auto", "reference", "associative", "chunked", "pallas", "pallas_interpret")
DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each block in the backward pass (`Mamba3LM.features(remat=...)`):
# none: keep every activation; full: keep only the block input; dots / dots_no_batch: keep
# matmul outputs (jax.checkpoint_policies.dots[_with_no_batch_dims]_saveable);
# "names:a,b": keep only the activations tagged with these names in layers.py.
REMAT_KINDS = ("none", "full", "dots", "dots_no_batch")
REMAT_NAMES = ("in_proj", "ssm_out", "mixer_out", "mlp_hidden", "mlp_out", "kernels")
# "kernels" is not a checkpoint_name: it saves the outputs of every Pallas kernel (the SSM's
# forward kernels then run once; their residuals live behind a custom_vjp, out of names' reach)
# Attribute of the model holding the stacked layers (scan_layers): every variable below it has a
# leading layer (or layer-group) axis. See ModelConfig.stacked_location.
STACKED = "blocks"
# Fields of earlier versions that ModelConfig.from_dict drops from a saved run's config.
# part_matmuls (either value): it only split the same in_proj / fc1 matmuls, same maths
RETIRED_FIELDS = ("part_matmuls",)


def parse_remat(spec: str) -> tuple[str, tuple[str, ...]]:
    """A remat spec -> (kind, saved names); kind is one of REMAT_KINDS or "names"."""
    if not isinstance(spec, str):
        raise ValueError(f"remat must be a string, got {spec!r}")
    if spec in REMAT_KINDS:
        return spec, ()
    if spec.startswith("names:"):
        names = tuple(n.strip() for n in spec[len("names:"):].split(",") if n.strip())
        bad = [n for n in names if n not in REMAT_NAMES]
        if names and not bad:
            return "names", names
        raise ValueError(f"remat {spec!r}: names must be a non-empty comma list from "
                         f"{REMAT_NAMES}")
    raise ValueError(f"remat must be one of {REMAT_KINDS} or 'names:<a>,<b>' with names from "
                     f"{REMAT_NAMES}, got {spec!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Mamba-3 language model (and the mixer's own settings).

    Mixer fields follow `state-spaces/mamba` `Mamba3(...)` names where one exists.
    """

    vocab_size: int = 257
    d_model: int = 256
    n_layer: int = 4
    # --- sequence mixer ---
    # the paper's baselines (mamba3_jax/baselines): "mamba2", "attention" (Transformer++),
    # "gated_deltanet" (keys of d_state and values of headdim channels per head, per-head q/k)
    mixer: str = "mamba3"
    d_state: int = 128
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    rope_fraction: float = 0.5
    mimo_rank: int = 1  # 1 = SISO
    is_outproj_norm: bool = False
    a_activation: str = "softplus"
    a_floor: float = 1e-4
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    chunk_size: Optional[int] = None  # None: 64 // mimo_rank (at least 8)
    scan_backend: str = "auto"
    # --- ablation switches (paper Tables 5a, 8, 10) ---
    discretization: str = "trapezoid"  # learned lambda | fixed 1/2 | exponential Euler (lambda = 1)
    rotation: str = "data_dependent"  # data-dependent angles | standard fixed-frequency RoPE | none
    rope_theta: float = 10000.0  # base of the fixed-frequency ablation
    # data-dependent angle per step: pi tanh(angles) dt (paper, True) or pi tanh(angles), not
    # scaled by dt (False: a state-tracking option, see docs/tasks.md "Why parity failed")
    rotation_dt: bool = True
    bc_bias: bool = True
    bc_bias_init: float = 1.0
    bc_bias_trainable: bool = True
    d_conv: int = 0  # >0 adds the Mamba-2 style causal depthwise conv (+SiLU) on x, B, C
    a_init_range: tuple = (1.0, 16.0)  # Mamba-2 / GDN: A = -exp(A_log), A_log = log U(range)
    # Gated DeltaNet only: write strength beta in (0, 2) instead of (0, 1), so the transition's
    # eigenvalues reach [-1, 1] (the paper's state-tracking variant)
    negative_eigenvalues: bool = False
    # --- attention (mixer="attention": the Transformer++ baseline); head size is `headdim` ---
    attn_heads: Optional[int] = None  # None: d_model // headdim
    attn_kv_heads: Optional[int] = None  # None: attn_heads (fewer: grouped-query attention)
    attn_rope: bool = True  # False: no positional encoding (NoPE)
    max_seq_len: int = 2048  # KV-cache positions for generation (prompt + new tokens)
    # hybrids: one letter a layer, repeated to n_layer: M = Mamba-3, A = attention (e.g. "MMMMMA",
    # the paper's 5:1; set attn_rope=False for its NoPE attention). "" = every layer `mixer`
    layer_pattern: str = ""
    # --- language model ---
    d_mlp: Optional[int] = None  # None: 2 * d_model; always rounded up to mlp_multiple_of
    mlp_multiple_of: int = 128
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    # one Block's parameters stacked along a leading layer axis and applied with lax.scan: the
    # layer is traced and compiled once (compile time independent of n_layer); same maths. A
    # hybrid layer_pattern scans over its repeats (one step = one period of the pattern)
    scan_layers: bool = False
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # master weights
    state_dtype: str = "float32"  # decode cache SSM state (float32 or bfloat16)

    def __post_init__(self):
        # a config read back from JSON has a list here: a tuple keeps the config hashable (it is
        # static in the model's graph definition, which keys model._jitted_layer's cache)
        if isinstance(self.a_init_range, list):
            object.__setattr__(self, "a_init_range", tuple(self.a_init_range))
        errors = []

        def need(cond, msg):
            if not cond:
                errors.append(msg)

        for name in ("vocab_size", "d_model", "n_layer", "d_state", "expand", "headdim", "ngroups",
                     "mimo_rank"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        if not errors:
            need((self.expand * self.d_model) % self.headdim == 0,
                 f"expand*d_model = {self.expand * self.d_model} must be divisible by headdim "
                 f"= {self.headdim}")
            if (self.expand * self.d_model) % self.headdim == 0:
                need(self.nheads % self.ngroups == 0,
                     f"nheads = {self.nheads} must be divisible by ngroups = {self.ngroups}")
            need(self.d_state % 2 == 0, f"d_state must be even, got {self.d_state}")
        need(self.rope_fraction in (0.5, 1.0),
             f"rope_fraction must be 0.5 or 1.0, got {self.rope_fraction!r}")
        need(self.a_activation in A_ACTIVATIONS,
             f"a_activation must be one of {A_ACTIVATIONS}, got {self.a_activation!r}")
        need(self.discretization in DISCRETIZATIONS,
             f"discretization must be one of {DISCRETIZATIONS}, got {self.discretization!r}")
        need(self.mixer in MIXERS, f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.mixer == "mamba2":
            need(self.mimo_rank == 1, "mixer='mamba2' is SISO: mimo_rank must be 1")
            need(self.d_conv > 0, "mixer='mamba2' needs its short conv: set d_conv (e.g. 4)")
            lo, hi = tuple(self.a_init_range)
            need(0 < lo <= hi, f"a_init_range must satisfy 0 < lo <= hi, got {self.a_init_range}")
        if self.mixer == "gated_deltanet":
            need(self.mimo_rank == 1, "mixer='gated_deltanet' is SISO: mimo_rank must be 1")
            lo, hi = tuple(self.a_init_range)
            need(0 < lo <= hi, f"a_init_range must satisfy 0 < lo <= hi, got {self.a_init_range}")
        need(isinstance(self.negative_eigenvalues, bool),
             f"negative_eigenvalues must be True or False, got {self.negative_eigenvalues!r}")
        if self.mixer == "attention" and not errors:
            need(self.attn_heads is not None or self.d_model % self.headdim == 0,
                 f"mixer='attention' without attn_heads needs d_model = {self.d_model} "
                 f"divisible by headdim = {self.headdim}")
            for name in ("attn_heads", "attn_kv_heads"):
                v = getattr(self, name)
                need(v is None or (isinstance(v, int) and v > 0),
                     f"{name} must be None or a positive integer, got {v!r}")
            if not errors:
                need(self.resolved_attn_heads % self.resolved_kv_heads == 0,
                     f"attn_heads = {self.resolved_attn_heads} must be a multiple of "
                     f"attn_kv_heads = {self.resolved_kv_heads}")
            need(self.headdim % 2 == 0 or not self.attn_rope,
                 f"RoPE needs an even headdim, got {self.headdim}")
        if self.layer_pattern:
            pat = self.layer_pattern
            need(isinstance(pat, str) and set(pat) <= set(LAYER_LETTERS),
                 f"layer_pattern must use the letters {sorted(LAYER_LETTERS)}, got {pat!r}")
            need(self.n_layer % len(pat) == 0,
                 f"n_layer = {self.n_layer} must be a multiple of len(layer_pattern) = "
                 f"{len(pat)}")
            need(self.mixer == "mamba3", "layer_pattern sets the mixers: leave mixer='mamba3'")
        need(isinstance(self.max_seq_len, int) and self.max_seq_len > 0,
             f"max_seq_len must be a positive integer, got {self.max_seq_len!r}")
        need(self.rotation in ROTATIONS,
             f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        need(self.scan_backend in SCAN_BACKENDS,
             f"scan_backend must be one of {SCAN_BACKENDS}, got {self.scan_backend!r}")
        for name in ("dtype", "param_dtype"):
            need(getattr(self, name) in DTYPES,
                 f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        need(self.state_dtype in ("float32", "bfloat16"),
             f"state_dtype must be float32 or bfloat16, got {self.state_dtype!r}")
        need(self.a_floor > 0, f"a_floor must be > 0, got {self.a_floor}")
        need(0 < self.dt_min <= self.dt_max, f"need 0 < dt_min <= dt_max, got {self.dt_min}, "
             f"{self.dt_max}")
        need(self.chunk_size is None or (isinstance(self.chunk_size, int) and self.chunk_size > 0),
             f"chunk_size must be None or a positive integer, got {self.chunk_size!r}")
        need(self.d_conv >= 0, f"d_conv must be >= 0, got {self.d_conv}")
        need(self.d_mlp is None or self.d_mlp > 0, f"d_mlp must be None or > 0, got {self.d_mlp}")
        need(self.mlp_multiple_of > 0, f"mlp_multiple_of must be > 0, got {self.mlp_multiple_of}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(isinstance(self.rotation_dt, bool),
             f"rotation_dt must be True or False, got {self.rotation_dt!r}")
        need(isinstance(self.scan_layers, bool),
             f"scan_layers must be True or False, got {self.scan_layers!r}")
        if errors:
            raise ValueError("invalid ModelConfig:\n  " + "\n  ".join(errors))

    # ----- derived sizes (one place for each) -----
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def num_rope_angles(self) -> int:
        """S: rotated channel pairs per B/C vector (0 when rotation is off)."""
        if self.rotation == "none":
            return 0
        return int(self.d_state * self.rope_fraction) // 2

    def layer_mixer(self, i: int) -> str:
        """The mixer of layer i: from layer_pattern when set, else `mixer`."""
        if not self.layer_pattern:
            return self.mixer
        return LAYER_LETTERS[self.layer_pattern[i % len(self.layer_pattern)]]

    @property
    def scan_group(self) -> int:
        """Layers per step of the layer scan (scan_layers): 1, or the period of a layer_pattern
        that mixes kinds (its layers at each position are stacked separately)."""
        pat = self.layer_pattern
        return len(pat) if pat and len(set(pat)) > 1 else 1

    def stacked_location(self, i: int) -> tuple[tuple, int]:
        """Layer i in the scan_layers layout: (path of its stacked variables in the model, index
        on their leading axis). One stacked Block: (("blocks",), i); a hybrid pattern of period
        g keeps one stacked Block per position: (("blocks", i % g), i // g)."""
        g = self.scan_group
        return ((STACKED,), i) if g == 1 else ((STACKED, i % g), i // g)

    @property
    def resolved_attn_heads(self) -> int:
        return self.attn_heads if self.attn_heads is not None else self.d_model // self.headdim

    @property
    def resolved_kv_heads(self) -> int:
        return self.attn_kv_heads if self.attn_kv_heads is not None else self.resolved_attn_heads

    @property
    def learned_lambda(self) -> bool:
        return self.discretization == "trapezoid"

    @property
    def data_dependent_angles(self) -> bool:
        return self.rotation == "data_dependent"

    @property
    def resolved_chunk_size(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(64 // self.mimo_rank, 8)

    @property
    def resolved_d_mlp(self) -> int:
        m = self.mlp_multiple_of
        width = self.d_mlp if self.d_mlp is not None else 2 * self.d_model
        return int(math.ceil(width / m) * m)

    @property
    def bc_width(self) -> int:
        """Width of B (and of C) in in_proj: rank x group x state (Gated DeltaNet: its keys and
        queries, one d_state vector per head)."""
        if self.mixer == "gated_deltanet":
            return self.nheads * self.d_state
        return self.mimo_rank * self.ngroups * self.d_state

    @property
    def in_proj_splits(self) -> tuple[tuple[str, int], ...]:
        """in_proj output layout, in order. Slots an ablation does not use are left out."""
        h = self.nheads
        parts = [("z", self.d_inner), ("x", self.d_inner), ("B", self.bc_width),
                 ("C", self.bc_width), ("dd_dt", h)]
        if self.mixer == "mamba2":
            return tuple(parts)
        if self.mixer == "gated_deltanet":  # z gate, x = v, B = k, C = q, dd_dt = decay input
            return tuple(parts) + (("beta", h),)
        parts.append(("dd_A", h))
        if self.learned_lambda:
            parts.append(("trap", h))
        if self.data_dependent_angles and self.num_rope_angles > 0:
            parts.append(("angles", self.num_rope_angles))
        return tuple(parts)

    @property
    def d_in_proj(self) -> int:
        return sum(n for _, n in self.in_proj_splits)

    @property
    def conv_channels(self) -> int:
        return self.d_inner + 2 * self.bc_width if self.d_conv else 0

    def mixer_params(self, mixer: Optional[str] = None) -> int:
        """Trainable parameters of one mixer of kind `mixer` (default: `self.mixer`); must equal
        the module's count."""
        h, r, p, n = self.nheads, self.mimo_rank, self.headdim, self.d_state
        if (mixer or self.mixer) == "attention":  # q, k, v, o projections
            q, kv = self.resolved_attn_heads * p, self.resolved_kv_heads * p
            return self.d_model * (2 * q + 2 * kv)
        total = self.d_model * self.d_in_proj + self.d_inner * self.d_model  # in/out proj
        if self.mixer == "gated_deltanet":  # dt_bias, A_log, output norm over P, conv
            return total + 2 * h + p + (self.d_conv + 1) * self.conv_channels
        if self.mixer == "mamba2":  # dt_bias, A_log, D, gated norm, conv
            return total + 3 * h + self.d_inner + (self.d_conv + 1) * self.conv_channels
        total += 2 * h + 2 * n  # dt_bias, D, B/C norm gains
        if self.bc_bias and self.bc_bias_trainable:
            total += 2 * h * r * n
        if r > 1:
            total += 3 * h * r * p
        if self.is_outproj_norm:
            total += self.d_inner
        if self.d_conv:
            total += (self.d_conv + 1) * self.conv_channels
        return total

    def num_params(self) -> int:
        """Trainable parameters of the language model."""
        d, f = self.d_model, self.resolved_d_mlp
        mixers = sum(self.mixer_params(self.layer_mixer(i)) for i in range(self.n_layer))
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embed + mixers + self.n_layer * (2 * d + 3 * d * f) + d

    def describe(self) -> str:
        """A short name of the architecture for log lines, e.g. "Mamba-3 MIMO R=4, 2 x 128",
        "Transformer++, 2 x 128", "hybrid MMMMMA (NoPE attention), 12 x 64"."""
        names = {"mamba2": "Mamba-2", "gated_deltanet": "Gated DeltaNet",
                 "attention": "Transformer++" if self.attn_rope else "Transformer (NoPE)",
                 "mamba3": f"Mamba-3 MIMO R={self.mimo_rank}" if self.mimo_rank > 1
                 else "Mamba-3 SISO"}
        if self.layer_pattern:
            kind = (f"hybrid {self.layer_pattern} ({names['mamba3']}, "
                    f"{'RoPE' if self.attn_rope else 'NoPE'} attention)")
        else:
            kind = names[self.mixer]
        return f"{kind}, {self.n_layer} x {self.d_model}"

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        """Build from a dict / ConfigDict, rejecting unknown keys with the list of valid ones
        (RETIRED_FIELDS, which a saved run's config may hold, are dropped)."""
        d = {k: v for k, v in dict(d).items() if k not in RETIRED_FIELDS}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
