"""Checkpoint conversion between this framework and the official PyTorch `MambaLMHeadModel`.

    python -m mamba3_jax.convert --from runs/tiny --to out/model.safetensors     # ours -> torch
    python -m mamba3_jax.convert --from out/model.safetensors --to runs/imported  # torch -> ours

Our side is a training run directory (`checkpoints/<step>/...`, read with
`mamba3_jax.load.load_model`, written as a checkpoint that `load_model` and
`python -m mamba3_jax.generate` read). The PyTorch side is a state dict of
`mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel` with Mamba-3 (SISO or MIMO) or Mamba-2
layers and attention (`MHA`) layers (Transformer++, Mamba-3 hybrids), in a `.safetensors` file
or a `torch.save` file (`.bin`, `.pt`, `.pth`), with the official `config.json` (a
`MambaConfig`) beside it. The key map, the layouts and what cannot be
converted: docs/weights.md "Whole-model checkpoints".

The maths is in pure functions on flat dicts of numpy arrays: `to_official` / `from_official`
(state dicts), `official_config` / `config_from_official` (configs). Both layer layouts of our
model are handled: unrolled (`layers.<i>.<name>`) and stacked (`blocks.<name>` with a leading
layer axis, `ModelConfig.scan_layers`; a hybrid pattern: `blocks.<position>.<name>`, see
`ModelConfig.stacked_location`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable, Optional

import numpy as np

from mamba3_jax.config import ModelConfig

Path = tuple  # a path into our parameter tree, e.g. ("layers", 0, "mixer", "D")


def mimo_channel_permutation(d_state: int, num_angles: int) -> np.ndarray:
    """perm such that ours[..., n] = reference_mimo[..., perm[n]] on the N (state) axis.

    The reference MIMO kernels rotate pairs (i, i + N/2) for i < S; we rotate (2i, 2i + 1).
    """
    half = d_state // 2
    rotated = [c for i in range(num_angles) for c in (i, i + half)]
    rest = [n for n in range(d_state) if n not in set(rotated)]
    return np.asarray(rotated + rest, np.int64)


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted (the message says why)."""


# ----------------------------------------------------------------------------- configs

# GatedMLP rounds its hidden width up to this; MambaConfig defaults we write out explicitly
OFFICIAL_MLP_MULTIPLE = 128
OFFICIAL_NORM_EPS = 1e-5


def official_config(cfg: ModelConfig, *, force: bool = False) -> dict:
    """The `MambaConfig` (as a JSON dict) of an official model computing what `cfg` computes.

    ConversionError if `cfg` uses something the official layers lack. `force` lets through the
    one difference that keeps the weights meaningful: our softplus A activation (the official
    Mamba-3 layer always uses heavy_tail)."""
    kinds = [cfg.layer_mixer(i) for i in range(cfg.n_layer)]
    problems = []
    if cfg.mixer == "mamba3":
        if cfg.discretization != "trapezoid":
            problems.append(f"discretization={cfg.discretization!r} (official: learned "
                            "trapezoid only)")
        if cfg.rotation != "data_dependent" or cfg.num_rope_angles == 0:
            problems.append(f"rotation={cfg.rotation!r} (official: data-dependent only)")
        if not cfg.bc_bias:
            problems.append("bc_bias=False (official layers always have B/C biases)")
        if not getattr(cfg, "rotation_dt", True):  # a state-tracking option, if present
            problems.append("rotation_dt=False (official angles are always scaled by dt)")
        if cfg.d_conv:
            problems.append(f"d_conv={cfg.d_conv} (the conv ablation has no official "
                            "counterpart)")
        if cfg.a_activation != "heavy_tail" and not force and "mamba3" in kinds:
            problems.append(f"a_activation={cfg.a_activation!r} (the official Mamba3 always uses "
                            "heavy_tail; --force writes the weights anyway, outputs will differ)")
        ssm = {"layer": "Mamba3", "d_state": cfg.d_state, "expand": cfg.expand,
               "headdim": cfg.headdim, "ngroups": cfg.ngroups,
               "rope_fraction": cfg.rope_fraction, "dt_min": cfg.dt_min, "dt_max": cfg.dt_max,
               "dt_init_floor": cfg.dt_init_floor, "A_floor": cfg.a_floor,
               "is_outproj_norm": cfg.is_outproj_norm, "is_mimo": cfg.mimo_rank > 1,
               "mimo_rank": cfg.mimo_rank, "chunk_size": cfg.resolved_chunk_size}
    elif cfg.mixer == "attention":
        ssm = {}  # no SSM layer
    elif cfg.mixer == "gated_deltanet":
        ssm = {}
        problems.append("mixer='gated_deltanet' (the official MambaLMHeadModel has no Gated "
                        "DeltaNet layer)")
    else:
        ssm = {"layer": "Mamba2", "d_state": cfg.d_state, "d_conv": cfg.d_conv,
               "expand": cfg.expand, "headdim": cfg.headdim, "ngroups": cfg.ngroups,
               "A_init_range": list(cfg.a_init_range), "dt_min": cfg.dt_min,
               "dt_max": cfg.dt_max, "dt_init_floor": cfg.dt_init_floor}
    if cfg.resolved_d_mlp % OFFICIAL_MLP_MULTIPLE:
        problems.append(f"MLP width {cfg.resolved_d_mlp} is not a multiple of "
                        f"{OFFICIAL_MLP_MULTIPLE} (the official GatedMLP would round it up)")
    if cfg.norm_eps != OFFICIAL_NORM_EPS:
        problems.append(f"norm_eps={cfg.norm_eps} (official: {OFFICIAL_NORM_EPS})")
    if problems:
        raise ConversionError("the official MambaLMHeadModel cannot represent this model: "
                              + "; ".join(problems))
    attn = [i for i, k in enumerate(kinds) if k == "attention"]
    return {"d_model": cfg.d_model, "d_intermediate": cfg.resolved_d_mlp,
            "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size, "ssm_cfg": ssm,
            "attn_layer_idx": attn, "attn_cfg": official_attn_cfg(cfg) if attn else {},
            "rms_norm": True, "residual_in_fp32": True,
            "fused_add_norm": True,
            # 1: the official model keeps our vocabulary size instead of padding it
            "pad_vocab_size_multiple": 1, "tie_embeddings": cfg.tie_embeddings}


def official_attn_cfg(cfg: ModelConfig) -> dict:
    """`attn_cfg` of the official MHA computing our attention: causal, no biases, RoPE on the
    whole head in adjacent pairs (`rotary_emb_interleaved`, same frequencies) or none (NoPE)."""
    D = cfg.headdim
    return {"num_heads": cfg.resolved_attn_heads, "num_heads_kv": cfg.resolved_kv_heads,
            "head_dim": D, "causal": True, "qkv_proj_bias": False, "out_proj_bias": False,
            "rotary_emb_dim": D if cfg.attn_rope else 0, "rotary_emb_base": cfg.rope_theta,
            "rotary_emb_interleaved": True}


def _attention_from_official(attn: dict, d_model: int, problems: list) -> dict:
    """Our attention fields for an official attn_cfg; unsupported settings go to problems."""
    a = dict(attn)
    heads = int(a.pop("num_heads", 0))
    if heads <= 0:
        problems.append("attn_cfg lacks num_heads")
        return {}
    D = int(a.pop("head_dim", None) or d_model // heads)
    kw = {"attn_heads": heads, "attn_kv_heads": int(a.pop("num_heads_kv", None) or heads),
          "headdim": D}
    rot = int(a.pop("rotary_emb_dim", 0))
    kw["attn_rope"] = rot > 0
    kw["rope_theta"] = float(a.pop("rotary_emb_base", 10000.0))
    if rot not in (0, D):
        problems.append(f"rotary_emb_dim={rot} (we rotate the whole head, {D}, or nothing)")
    if rot and not a.pop("rotary_emb_interleaved", False):
        problems.append("rotary_emb_interleaved=False (we rotate adjacent pairs)")
    a.pop("rotary_emb_interleaved", None)
    for key, want in (("causal", True), ("qkv_proj_bias", False), ("out_proj_bias", False),
                      ("mlp_dim", 0), ("d_conv", 0), ("softmax_scale", None)):
        if key in a and a.pop(key) != want:
            problems.append(f"attn_cfg {key} other than {want!r}")
        elif key in ("causal", "qkv_proj_bias", "out_proj_bias") and key not in attn:
            problems.append(f"attn_cfg without {key} (the official default differs from ours)")
    if a:
        problems.append(f"unknown attn_cfg keys {sorted(a)}")
    return kw


def shortest_period(pattern: str) -> str:
    """The shortest prefix whose repeats make `pattern` ("MMMMMAMMMMMA" -> "MMMMMA"): the
    layer_pattern of an imported hybrid, so that scan_layers scans over its repeats (the full
    per-layer string would be a single scan step) and a round trip gives back our config."""
    n = len(pattern)
    for p in range(1, n + 1):
        if n % p == 0 and pattern[:p] * (n // p) == pattern:
            return pattern[:p]
    return pattern


# ssm_cfg keys whose official default is the only value we implement
_MAMBA2_FIXED = {"D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
                 "bias": False, "conv_bias": True, "d_ssm": None, "conv_init": None}
_MAMBA3_IGNORED = ("chunk_size", "dropout", "fuse_pregate_headwise_norm", "layer_idx", "n_layer")
_MAMBA2_IGNORED = ("chunk_size", "use_mem_eff_path", "dt_limit", "layer_idx",
                   "process_group", "sequence_parallel")


def config_from_official(official: dict, vocab_size: Optional[int] = None,
                         **overrides) -> ModelConfig:
    """Our ModelConfig for an official `MambaConfig` dict. `vocab_size` is the embedding's row
    count (the official model pads the configured one up to `pad_vocab_size_multiple`);
    `overrides` set our own fields (e.g. scan_layers, scan_backend)."""
    oc = dict(official)
    problems: list = []
    n_layer = int(oc["n_layer"])
    attn_idx = sorted(int(i) for i in oc.get("attn_layer_idx") or [])
    attn_kw = (_attention_from_official(oc.get("attn_cfg") or {}, int(oc["d_model"]), problems)
               if attn_idx else {})
    if not oc.get("rms_norm", True):
        problems.append("rms_norm=False (LayerNorm blocks are not supported)")
    d_mlp = int(oc.get("d_intermediate", 0))
    if d_mlp <= 0:
        problems.append("d_intermediate=0 (blocks without an MLP are not supported)")
    ssm = dict(oc.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    kw: dict = {}
    all_attention = len(attn_idx) == n_layer
    if all_attention:  # Transformer++: the ssm_cfg is unused
        kw = dict(mixer="attention")
        ssm, names, ignored = {}, {}, ()
    elif layer == "Mamba3":
        is_mimo = bool(ssm.pop("is_mimo", False))
        rank = int(ssm.pop("mimo_rank", 4))
        kw = dict(mixer="mamba3", a_activation="heavy_tail", discretization="trapezoid",
                  rotation="data_dependent", bc_bias=True, d_conv=0,
                  mimo_rank=rank if is_mimo else 1)
        names = {"d_state": "d_state", "expand": "expand", "headdim": "headdim",
                 "ngroups": "ngroups", "rope_fraction": "rope_fraction", "dt_min": "dt_min",
                 "dt_max": "dt_max", "dt_init_floor": "dt_init_floor", "A_floor": "a_floor",
                 "is_outproj_norm": "is_outproj_norm"}
        ignored = _MAMBA3_IGNORED
    elif layer == "Mamba2":
        kw = dict(mixer="mamba2", d_conv=4)
        for key, want in _MAMBA2_FIXED.items():
            if key in ssm and ssm.pop(key) != want:
                problems.append(f"Mamba2 {key} other than {want!r}")
        names = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand",
                 "headdim": "headdim", "ngroups": "ngroups", "A_init_range": "a_init_range",
                 "dt_min": "dt_min", "dt_max": "dt_max", "dt_init_floor": "dt_init_floor"}
        ignored = _MAMBA2_IGNORED
        if ssm.get("dt_limit") not in (None, [0.0, float("inf")], (0.0, float("inf"))):
            problems.append(f"Mamba2 dt_limit={ssm['dt_limit']!r} (not supported)")
    else:
        problems.append(f"ssm layer {layer!r} (supported: Mamba3, Mamba2)")
        names, ignored = {}, ()
    for key in list(ssm):
        if key in names:
            value = ssm.pop(key)
            kw[names[key]] = tuple(value) if key == "A_init_range" else value
        elif key in ignored:
            ssm.pop(key)
    if ssm:
        problems.append(f"unknown ssm_cfg keys {sorted(ssm)}")
    if attn_idx and not all_attention:
        if layer != "Mamba3":
            problems.append(f"attention mixed with {layer} layers (hybrids: Mamba-3 only)")
        kw["layer_pattern"] = shortest_period(
            "".join("A" if i in attn_idx else "M" for i in range(n_layer)))
        if "headdim" in kw and kw["headdim"] != attn_kw.get("headdim", kw["headdim"]):
            problems.append(f"attention head_dim {attn_kw['headdim']} differs from the Mamba "
                            f"headdim {kw['headdim']} (one headdim here)")
    kw.update(attn_kw)
    if problems:
        raise ConversionError("cannot convert this official model: " + "; ".join(problems))
    if vocab_size is None:
        vocab_size = int(oc["vocab_size"])
        mult = int(oc.get("pad_vocab_size_multiple", 1))
        vocab_size += (-vocab_size) % mult
    kw.update(vocab_size=vocab_size, d_model=int(oc["d_model"]), n_layer=n_layer,
              d_mlp=d_mlp, mlp_multiple_of=OFFICIAL_MLP_MULTIPLE, norm_eps=OFFICIAL_NORM_EPS,
              tie_embeddings=bool(oc.get("tie_embeddings", True)))
    kw.update(overrides)
    return ModelConfig(**kw)


# ----------------------------------------------------------------------------- key map

def _t(a):  # our Linear kernels are (in, out); PyTorch stores (out, in)
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One official parameter of a block: its key below `backbone.layers.<i>.`, our paths below
    the block that make it (one, or several for attention's fused q/k/v projection), and the
    array maps between them (per layer, no layer axis): to_official(*ours) -> array,
    from_official(array) -> tuple of ours."""
    ours: tuple
    official: str
    to_official: Callable
    from_official: Callable


def _one(path: Path, official: str, to=lambda a: a, back=lambda a: a) -> Entry:
    return Entry((path,), official, to, lambda a: (back(a),))


def _bc_maps(cfg: ModelConfig):
    """(to_official, from_official) of the N axis of B/C quantities: the MIMO permutation of
    docs/weights.md for Mamba-3 MIMO, identity otherwise."""
    if cfg.mixer != "mamba3" or cfg.mimo_rank == 1:
        return (lambda a: a), (lambda a: a)
    perm = mimo_channel_permutation(cfg.d_state, cfg.num_rope_angles)
    inv = np.argsort(perm)
    return (lambda a: np.take(a, inv, axis=-1)), (lambda a: np.take(a, perm, axis=-1))


def _in_proj_maps(cfg: ModelConfig):
    """in_proj (ours (d, d_in_proj) <-> official (d_in_proj, d)), with the B and C rows'
    N axis permuted for MIMO (rows laid out (rank, group, state))."""
    to_n, from_n = _bc_maps(cfg)
    E, W = cfg.d_inner, cfg.bc_width

    def on_bc(w, f):  # w: (d_in_proj, d) official orientation
        w = w.copy()
        for start in (2 * E, 2 * E + W):
            block = w[start:start + W].reshape(cfg.mimo_rank, cfg.ngroups, cfg.d_state, -1)
            w[start:start + W] = np.moveaxis(f(np.moveaxis(block, 2, -1)), -1, 2).reshape(W, -1)
        return w

    return (lambda a: on_bc(_t(a), to_n)), (lambda a: _t(on_bc(a, from_n)))


def _attention_entries(cfg: ModelConfig) -> list[Entry]:
    """The official MHA fuses q, k, v into one in_proj (rows [q (N*D), k (K*D), v (K*D)])."""
    m = "mixer"
    q, kv = cfg.resolved_attn_heads * cfg.headdim, cfg.resolved_kv_heads * cfg.headdim
    paths = tuple((m, name, "kernel") for name in ("q_proj", "k_proj", "v_proj"))
    return [Entry(paths, "mixer.in_proj.weight",
                  lambda a, b, c: np.concatenate([_t(a), _t(b), _t(c)], axis=0),
                  lambda w: (_t(w[:q]), _t(w[q:q + kv]), _t(w[q + kv:]))),
            _one((m, "o_proj", "kernel"), "mixer.out_proj.weight", _t, _t)]


def block_entries(cfg: ModelConfig, mixer: Optional[str] = None) -> list[Entry]:
    """The key map of one block whose mixer is `mixer` (default cfg.mixer); docs/weights.md
    "Whole-model checkpoints"."""
    m = "mixer"
    out = [_one(("norm1", "weight"), "norm.weight"),
           _one(("norm2", "weight"), "norm2.weight"),
           _one(("mlp", "fc1", "kernel"), "mlp.fc1.weight", _t, _t),
           _one(("mlp", "fc2", "kernel"), "mlp.fc2.weight", _t, _t)]
    mixer = mixer or cfg.mixer
    if mixer == "attention":
        return out + _attention_entries(cfg)
    out += [_one((m, "in_proj", "kernel"), "mixer.in_proj.weight", *_in_proj_maps(cfg)),
            _one((m, "out_proj", "kernel"), "mixer.out_proj.weight", _t, _t),
            _one((m, "dt_bias"), "mixer.dt_bias"),
            _one((m, "D"), "mixer.D")]
    if mixer == "mamba2":
        K, ch = cfg.d_conv, cfg.conv_channels
        out += [_one((m, "conv_weight"), "mixer.conv1d.weight",  # torch: (ch, 1, K)
                     lambda a: _t(a)[:, None, :], lambda a: _t(a.reshape(ch, K))),
                _one((m, "conv_bias"), "mixer.conv1d.bias"),
                _one((m, "A_log"), "mixer.A_log"),
                _one((m, "norm"), "mixer.norm.weight")]
        return out
    to_n, from_n = _bc_maps(cfg)
    out += [_one((m, "B_norm"), "mixer.B_norm.weight", to_n, from_n),
            _one((m, "C_norm"), "mixer.C_norm.weight", to_n, from_n),
            _one((m, "B_bias"), "mixer.B_bias", to_n, from_n),
            _one((m, "C_bias"), "mixer.C_bias", to_n, from_n)]
    if cfg.mimo_rank > 1:
        out += [_one((m, name), f"mixer.{name}") for name in ("mimo_x", "mimo_z", "mimo_o")]
    if cfg.is_outproj_norm:
        H, P = cfg.nheads, cfg.headdim
        out.append(_one((m, "norm"), "mixer.norm.weight", lambda a: a.reshape(H * P),
                        lambda a: a.reshape(H, P)))
    return out


class _Source:
    """A dict read key by key, remembering what was read (so leftovers can be reported)."""

    def __init__(self, items: dict, what: str):
        self.items, self.what, self.used = items, what, set()

    def take(self, key):
        if key not in self.items:
            name = ".".join(map(str, key)) if isinstance(key, tuple) else repr(key)
            raise ConversionError(f"{self.what} lacks {name}")
        self.used.add(key)
        return self.items[key]

    def left(self) -> list:
        return sorted(".".join(map(str, k)) if isinstance(k, tuple) else k
                      for k in set(self.items) - self.used)


def _layer_array(take, cfg: ModelConfig, i: int, path: Path) -> np.ndarray:
    """Layer i's array at `path` (below the block) in either layer layout."""
    if not cfg.scan_layers:
        return take(("layers", i) + path)
    prefix, index = cfg.stacked_location(i)  # stacked: one slice of the leading axis
    return take(prefix + path)[index]


def to_official(flat: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our weights {path: array} (either layer layout) -> the official state dict."""
    src = _Source({tuple(k): np.asarray(v) for k, v in flat.items()}, "our checkpoint")
    take = src.take
    sd = {"backbone.embedding.weight": take(("embed", "embedding")),
          "backbone.norm_f.weight": take(("final_norm", "weight"))}
    for i in range(cfg.n_layer):
        for e in block_entries(cfg, cfg.layer_mixer(i)):
            arrays = [_layer_array(take, cfg, i, p) for p in e.ours]
            sd[f"backbone.layers.{i}.{e.official}"] = np.ascontiguousarray(
                e.to_official(*arrays))
    # always written (a copy when tied) so that a strict load_state_dict finds it
    sd["lm_head.weight"] = (sd["backbone.embedding.weight"] if cfg.tie_embeddings
                            else _t(take(("lm_head",))))
    if src.left():
        raise ConversionError(f"parameters with no official counterpart: {src.left()}")
    return sd


def from_official(sd: dict, cfg: ModelConfig) -> dict[Path, np.ndarray]:
    """An official state dict -> our weights {path: array} in `cfg`'s layer layout."""
    src = _Source({k: np.asarray(v) for k, v in sd.items()}, "the state dict")
    take, sd = src.take, src.items
    emb = take("backbone.embedding.weight")
    flat: dict = {("embed", "embedding"): emb,
                  ("final_norm", "weight"): take("backbone.norm_f.weight")}
    if "lm_head.weight" in sd:
        head = take("lm_head.weight")
        if cfg.tie_embeddings and not np.array_equal(head, emb):
            raise ConversionError("tie_embeddings is set but lm_head.weight differs from the "
                                  "embedding")
        if not cfg.tie_embeddings:
            flat[("lm_head",)] = _t(head)
    elif not cfg.tie_embeddings:
        raise ConversionError("the state dict lacks 'lm_head.weight' (untied embeddings)")
    stacked: dict = {}
    for i in range(cfg.n_layer):
        for e in block_entries(cfg, cfg.layer_mixer(i)):
            parts = e.from_official(take(f"backbone.layers.{i}.{e.official}"))
            for path, a in zip(e.ours, parts, strict=True):
                if cfg.scan_layers:  # appended in layer order = leading-axis order
                    stacked.setdefault(cfg.stacked_location(i)[0] + path, []).append(a)
                else:
                    flat[("layers", i) + path] = a
    flat.update({k: np.stack(v) for k, v in stacked.items()})
    left = src.left()
    if left:
        raise ConversionError(f"state dict keys with no counterpart here: {left[:8]}"
                              + (f" and {len(left) - 8} more" if len(left) > 8 else ""))
    return flat


# ----------------------------------------------------------------------------- our models

def _flatten(tree, prefix=()) -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (k,)))
        return out
    return {prefix: tree}


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def model_weights(model) -> dict[Path, np.ndarray]:
    """Every variable of a Mamba3LM (params and frozen buffers) as {path: numpy array}."""
    from flax import nnx

    _, params, rest = nnx.split(model, nnx.Param, ...)
    flat = _flatten(nnx.to_pure_dict(params))
    flat.update(_flatten(nnx.to_pure_dict(rest)))
    return {k: np.asarray(v) for k, v in flat.items()}


def weights_to_state(cfg: ModelConfig, flat: dict) -> tuple:
    """(graphdef, {"params", "frozen"} pure dicts) of a Mamba3LM holding `flat`, cast to the
    model's dtypes; ConversionError on a missing, extra or mis-shaped parameter."""
    import jax.numpy as jnp
    from flax import nnx

    from mamba3_jax.model import Mamba3LM

    model = nnx.eval_shape(lambda: Mamba3LM(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = {tuple(k): v for k, v in flat.items()}
    out = {}
    seen = set()
    for name, part in (("params", params), ("frozen", rest)):
        want = _flatten(nnx.to_pure_dict(part))
        got = {}
        for path, sds in want.items():
            if path not in flat:
                raise ConversionError(f"missing parameter {'.'.join(map(str, path))}")
            a = np.asarray(flat[path])
            if a.shape != tuple(sds.shape):
                raise ConversionError(f"{'.'.join(map(str, path))}: shape {a.shape}, the config "
                                      f"wants {tuple(sds.shape)}")
            got[path] = jnp.asarray(a, sds.dtype)
            seen.add(path)
        out[name] = _unflatten(got)
    extra = sorted(".".join(map(str, k)) for k in set(flat) - seen)
    if extra:
        raise ConversionError(f"parameters the config does not have: {extra}")
    return graphdef, out


def build_model(cfg: ModelConfig, flat: dict):
    """A Mamba3LM holding the weights `flat` ({path: array})."""
    from flax import nnx

    graphdef, state = weights_to_state(cfg, flat)
    return nnx.merge(graphdef, state["params"], state["frozen"])


def write_run(workdir: str, cfg: ModelConfig, flat: dict, *, tokenizer: str = "byte",
              step: int = 0) -> str:
    """Write `flat` as checkpoint `step` of a run directory that `load.load_model` and the
    generation CLI read (model weights and config only: no optimizer or data state, so it is
    not a training run to resume). Returns the step directory."""
    from mamba3_jax.data.tokenizers import get_tokenizer
    from mamba3_jax.training.checkpoint import Checkpointer
    from mamba3_jax.training.config import base_config, to_dict

    n = get_tokenizer(tokenizer).vocab_size
    if n > cfg.vocab_size:
        raise ConversionError(f"tokenizer {tokenizer!r} has {n} tokens, the model's vocabulary "
                              f"only {cfg.vocab_size} (pass --tokenizer)")
    config = to_dict(base_config())
    config["model"] = dict(cfg.to_dict(), a_init_range=list(cfg.a_init_range))
    config["data"]["tokenizer"] = tokenizer
    _, state = weights_to_state(cfg, flat)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    try:
        ckpt.save(step, state, None, config)
    finally:
        ckpt.close()
    return ckpt.step_dir(step)


# ----------------------------------------------------------------------------- files

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def file_kind(path: str) -> str:
    """'safetensors' | 'torch' | 'run' (a run directory) from a path's suffix."""
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith(TORCH_SUFFIXES):
        return "torch"
    return "run"


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A state dict from a .safetensors or torch.save file, as numpy (bfloat16 kept)."""
    if file_kind(path) == "safetensors":
        from safetensors.flax import load_file

        return {k: np.asarray(v) for k, v in load_file(path).items()}
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(sd).__name__}")
    sd = sd.get("state_dict", sd)  # some trainers wrap the weights

    def to_np(t):
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: go through jax's
            import jax.numpy as jnp

            return np.asarray(jnp.asarray(t.float().numpy(), jnp.bfloat16))
        return t.numpy()

    return {k: to_np(v) for k, v in sd.items()}


def write_state_dict(sd: dict, path: str) -> None:
    """Write a state dict as .safetensors or torch.save, by suffix."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if file_kind(path) == "safetensors":
        import jax.numpy as jnp
        from safetensors.flax import save_file

        save_file({k: jnp.asarray(v) for k, v in sd.items()}, path)
        return
    import torch

    def to_t(a):
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        return torch.tensor(a)  # a copy: arrays from jax are read-only

    out = {k: to_t(v) for k, v in sd.items()}
    if "lm_head.weight" in out and np.shares_memory(sd["lm_head.weight"],
                                                     sd["backbone.embedding.weight"]):
        out["lm_head.weight"] = out["backbone.embedding.weight"]  # tied: one storage, as torch
    torch.save(out, path)


def official_config_path(weights: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(weights)), "config.json")


# ----------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m mamba3_jax.convert",
                 description="Convert between our run checkpoints and official PyTorch "
                             "MambaLMHeadModel state dicts (.safetensors, .bin/.pt/.pth).")
    ap.add_argument("--from", dest="src", required=True,
                    help="a run directory, or an official .safetensors / torch.save file")
    ap.add_argument("--to", dest="dst", required=True,
                    help="an official .safetensors / .bin / .pt / .pth file (config.json is "
                         "written beside it), or a new run directory")
    ap.add_argument("--step", type=int, default=None,
                    help="checkpoint step of --from run (default: newest)")
    ap.add_argument("--config", default=None,
                    help="official config.json of --from (default: config.json beside it)")
    ap.add_argument("--tokenizer", default="byte",
                    help="tokenizer recorded in a new run (byte | gpt2 | cl100k_base | "
                         "path/to/tokenizer.json; official Mamba models use GPT-NeoX's)")
    ap.add_argument("--scan_layers", action="store_true",
                    help="store the new run's layers stacked (ModelConfig.scan_layers)")
    ap.add_argument("--force", action="store_true",
                    help="export a softplus-A model although the official layer uses heavy_tail")
    ap.add_argument("--a_activation", choices=("heavy_tail", "softplus"), default=None,
                    help="import only: the Mamba-3 A activation of the new run (default "
                         "heavy_tail, what the official layer computes; softplus brings back a "
                         "model exported with --force unchanged)")
    args = ap.parse_args(argv)
    src, dst = file_kind(args.src), file_kind(args.dst)
    if (src == "run") == (dst == "run"):
        _fail("one of --from / --to must be a run directory and the other a .safetensors, "
              ".bin, .pt or .pth file")
    if args.a_activation is not None and src == "run":
        _fail("--a_activation applies to imports (--from a .safetensors / torch.save file); "
              "an export keeps the run's own")
    if not os.path.exists(args.src):
        _fail(f"--from {args.src!r} does not exist")
    if dst == "run" and os.path.exists(os.path.join(args.dst, "checkpoints")):
        _fail(f"--to {args.dst!r} already has checkpoints; pick a new directory")
    try:
        if src == "run":
            from mamba3_jax.load import load_model, read_run

            info = read_run(args.src, args.step)  # checks the step before any weights are read
            cfg = info.model_config
            oc = official_config(cfg, force=args.force)
            run = load_model(args.src, info.step)
            write_state_dict(to_official(model_weights(run.model), cfg), args.dst)
            with open(official_config_path(args.dst), "w", encoding="utf-8") as f:
                json.dump(oc, f, indent=2)
            print(f"wrote {args.dst} and {official_config_path(args.dst)} "
                  f"({cfg.describe()}, step {info.step})")
            if cfg.a_activation != "heavy_tail" and oc["ssm_cfg"].get("layer") == "Mamba3":
                print(f"note: the model uses a_activation={cfg.a_activation!r}; the official "
                      "Mamba3 layer computes heavy_tail, so its outputs differ from ours. To "
                      "import these weights back unchanged, pass --a_activation "
                      f"{cfg.a_activation}")
        else:
            cpath = args.config or official_config_path(args.src)
            if not os.path.exists(cpath):
                _fail(f"no official config: {cpath!r} does not exist (pass --config)")
            with open(cpath, encoding="utf-8") as f:
                oc = json.load(f)
            sd = read_state_dict(args.src)
            emb = sd.get("backbone.embedding.weight")
            if emb is None:
                _fail(f"{args.src}: not a MambaLMHeadModel state dict (no "
                      "backbone.embedding.weight)")
            overrides = {"scan_layers": args.scan_layers}
            if args.a_activation is not None:
                overrides["a_activation"] = args.a_activation
            cfg = config_from_official(oc, vocab_size=emb.shape[0], **overrides)
            step_dir = write_run(args.dst, cfg, from_official(sd, cfg),
                                 tokenizer=args.tokenizer)
            has_mamba3 = any(cfg.layer_mixer(i) == "mamba3" for i in range(cfg.n_layer))
            print(f"wrote {step_dir} ({cfg.describe()}, vocab {cfg.vocab_size}"
                  + (f", a_activation {cfg.a_activation})" if has_mamba3 else ")"))
    except (ConversionError, FileNotFoundError, ValueError) as e:
        _fail(" ".join(str(e).split()))  # one line
    return 0


if __name__ == "__main__":
    sys.exit(main())
