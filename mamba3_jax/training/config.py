"""The training config: an `ml_collections.ConfigDict` with sections model, data, optim, train,
mesh and debug.

`base_config()` holds every key with its default; config files (`configs/*.py`) start from it and
change values. `validate(config)` checks key names against this schema and every value, and
raises `ConfigError` listing all problems at once. `flatten` / `diff_configs` support the
checkpoint compatibility check (a checkpoint stores the config it was trained with).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from mamba3_jax.config import RETIRED_FIELDS, ModelConfig, parse_remat

SCHEDULES = ("cosine", "wsd", "constant", "linear")
WSD_DECAY_SHAPES = ("linear", "sqrt", "cosine")

# Keys whose value is a free-form dict handed to another factory (not checked against the schema).
FREE_FORM = ("data.train_source", "data.eval_source")

# Keys that may differ between a checkpoint and the run resuming from it without changing the
# trajectory of the already-trained steps (logging, checkpoint cadence, run length, device layout).
RESUME_SAFE_PREFIXES = (
    "train.steps", "train.log_every", "train.eval_every", "train.eval_steps",
    "train.checkpoint_every", "train.keep", "train.async_checkpoint", "train.progress",
    "train.tensorboard", "train.peak_flops_per_device", "train.allow_config_change",
    "train.compilation_cache_dir", "train.loss_chunk", "train.remat", "train.profile_steps",
    "train.deterministic", "train.xla_triton_gemm",
    "mesh.", "debug.", "data.prefetch",
    "data.num_threads", "data.eval_source", "data.eval_batch_size",
)


TRITON_GEMM_CHOICES = ("auto", "on", "off")  # train.xla_triton_gemm


class ConfigError(ValueError):
    """A config with unknown keys or bad values; the message lists every problem."""


def _model_section() -> ml_collections.ConfigDict:
    sec = ml_collections.ConfigDict()
    for f in dataclasses.fields(ModelConfig):
        default = f.default
        if default is None:  # Optional[int] fields (chunk_size, d_mlp) stay overridable
            sec[f.name] = config_dict.placeholder(int)
        else:
            sec[f.name] = default
    sec.vocab_size = 0  # 0: the tokenizer's vocab size, rounded up to data.vocab_multiple
    return sec


def base_config() -> ml_collections.ConfigDict:
    """Every training option with its default (the schema that `validate` checks against)."""
    c = ml_collections.ConfigDict()
    c.model = _model_section()

    c.data = ml_collections.ConfigDict()
    c.data.train_source = ml_collections.ConfigDict({"kind": "books", "split": "train"})
    c.data.eval_source = ml_collections.ConfigDict({"kind": "books", "split": "valid"})
    c.data.tokenizer = "byte"  # byte | gpt2 | cl100k_base | path/to/tokenizer.json
    c.data.seq_len = 256
    c.data.batch_size = 16  # global batch, in sequences (all hosts, all microbatches)
    c.data.eval_batch_size = 0  # 0: data.batch_size
    c.data.num_streams = 0  # 0: the pipeline's default (min(batch, documents))
    c.data.num_threads = 0  # background tokenizer threads
    c.data.prefetch = 2  # batches built ahead in a background thread
    c.data.vocab_multiple = 1  # model.vocab_size=0 rounds the tokenizer's vocab up to this

    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = 3e-3
    c.optim.end_lr = 1e-5  # floor of the decay
    c.optim.init_lr = 0.0  # start of the linear warmup
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # cosine | wsd | constant | linear
    c.optim.decay_steps = 0  # 0: train.steps (schedule length including warmup)
    c.optim.wsd_decay_fraction = 0.2  # wsd: last fraction of the steps spent decaying
    c.optim.wsd_decay_shape = "linear"  # linear | sqrt (1 - sqrt) | cosine
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = False  # apply weight decay to the (tied) embedding too
    c.optim.clip_norm = 1.0  # global-norm gradient clipping; 0 turns it off

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.seed = 0  # model init, data order and the step RNG
    c.train.grad_accum = 1  # microbatches per step (scan inside the jitted step)
    c.train.loss_chunk = 0  # >0: compute logits/loss this many positions at a time (memory)
    c.train.remat = "none"  # per-block recompute: none | full | dots | dots_no_batch | names:a,b
    c.train.profile_steps = ""  # "10:13": jax.profiler trace of steps 10-12 into workdir/profile
    c.train.log_every = 10
    c.train.eval_every = 200  # 0: no periodic evaluation (one at the end if eval_steps > 0)
    c.train.eval_steps = 20  # validation batches per evaluation; 0: no evaluation
    c.train.checkpoint_every = 200  # 0: only the final checkpoint
    c.train.keep = 3  # checkpoints kept
    c.train.async_checkpoint = True
    c.train.progress = True  # live progress line on a terminal
    c.train.tensorboard = True  # when tensorboardX (or tensorboard) is importable
    c.train.peak_flops_per_device = 0.0  # 0: look the device up in flops.PEAK_FLOPS
    c.train.allow_config_change = False  # resume even if the checkpoint's config differs
    c.train.compilation_cache_dir = ""  # jax persistent compilation cache ("" = off)
    # GPU: --xla_gpu_deterministic_ops=true, so that a resumed run repeats the same bits
    # (no effect on CPU, which is deterministic already; see docs/training.md for the cost)
    c.train.deterministic = True
    # GPU: XLA's Triton GEMM fusions. "off" adds --xla_gpu_enable_triton_gemm=false (cuBLAS for
    # every matmul: 4-6% faster steps with unrolled layers on an H200, docs/benchmarks.md);
    # "auto": off with unrolled layers, XLA's default under model.scan_layers (not yet compared)
    c.train.xla_triton_gemm = "auto"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left after fsdp
    c.mesh.fsdp = 1  # params/optimizer state sharded over this many devices
    c.mesh.fsdp_min_size = 1024  # leaves with fewer elements stay replicated
    # the loss and gradients per device on its rows (shard_map), summed over devices (fsdp
    # shards gathered whole at the step's start); False leaves the partitioning to XLA (which
    # gathers the Pallas kernels' operands onto every device)
    c.mesh.manual_data_parallel = True

    c.debug = ml_collections.ConfigDict()
    c.debug.inject_nan_at_step = -1  # make the loss of this step (1-based) NaN
    c.debug.step_delay = 0.0  # seconds of host sleep after each step (kill/resume tests)
    c.debug.check_finite = True  # stop on a non-finite loss / grad norm / param norm
    c.debug.kill_at_checkpoint = -1  # SIGKILL the run just after starting this step's save (tests)
    return c


# ----------------------------------------------------------------------------- flattening


def to_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}. Free-form sections are kept as one (JSON-normalised) value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if hasattr(v, "to_dict"):
            v = v.to_dict()
        if isinstance(v, Mapping) and key not in FREE_FORM:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.loads(json.dumps(v, sort_keys=True, default=str))
    return out


def config_json(config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True, default=str)


def diff_configs(saved: Mapping, current: Mapping, ignore=()) -> list[tuple[str, Any, Any]]:
    """Keys whose values differ: [(key, saved, current)], skipping keys starting with `ignore`.
    A key the saved config lacks counts as its default (a field added since that run); a
    retired model field it holds (config.RETIRED_FIELDS) is skipped."""
    a, b = flatten(saved), flatten(current)
    defaults = flatten(to_dict(base_config()))
    retired = {f"model.{name}" for name in RETIRED_FIELDS}
    out = []
    for key in sorted(set(a) | set(b)):
        if key in retired:  # only an earlier run has it; it changes nothing now
            continue
        if any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".")
               for p in ignore):
            continue
        va, vb = a.get(key, defaults.get(key, "<missing>")), b.get(key, "<missing>")
        if va != vb:
            out.append((key, va, vb))
    return out


def format_diff(diff) -> str:
    return "\n".join(f"  {k}: checkpoint={a!r} current={b!r}" for k, a, b in diff)


# ----------------------------------------------------------------------------- validation


def _unknown_keys(config: Mapping, schema: Mapping, prefix: str = "") -> list[str]:
    errors = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        if k not in schema:
            valid = ", ".join(sorted(schema))
            where = prefix[:-1] if prefix else "config"
            errors.append(f"unknown key {key!r}; valid keys of {where}: {valid}")
            continue
        if key in FREE_FORM:
            continue
        sub = schema[k]
        if isinstance(v, Mapping) and isinstance(sub, Mapping):
            errors.extend(_unknown_keys(v, sub, key + "."))
    return errors


def validate(config) -> None:
    """Raise ConfigError listing every unknown key and bad value (device checks: see mesh.py)."""
    cfg = to_dict(config)
    errors = _unknown_keys(cfg, base_config().to_dict())
    if errors:
        raise _config_error(errors)

    def need(cond, msg):
        if not cond:
            errors.append(msg)

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    d, o, t, m, g = cfg["data"], cfg["optim"], cfg["train"], cfg["mesh"], cfg["debug"]
    for sec_name, sec, keys in (("data", d, ("seq_len", "batch_size")),
                                ("train", t, ("steps", "grad_accum", "log_every", "keep")),
                                ("data", d, ("vocab_multiple",))):
        for k in keys:
            need(is_int(sec[k]) and sec[k] >= 1,
                 f"{sec_name}.{k} must be a positive integer, got {sec[k]!r}")
    for sec_name, sec, keys in (("train", t, ("eval_every", "eval_steps", "checkpoint_every",
                                             "loss_chunk")),
                                ("data", d, ("eval_batch_size", "num_streams", "num_threads",
                                             "prefetch")),
                                ("optim", o, ("warmup_steps", "decay_steps"))):
        for k in keys:
            need(is_int(sec[k]) and sec[k] >= 0,
                 f"{sec_name}.{k} must be an integer >= 0, got {sec[k]!r}")
    for src in ("train_source", "eval_source"):
        spec = d[src]
        need(isinstance(spec, Mapping) and spec.get("kind"),
             f"data.{src} must be a dict with a 'kind' (e.g. {{'kind': 'books', 'split': "
             f"'train'}}), got {spec!r}")
    need(isinstance(d["tokenizer"], str) and d["tokenizer"],
         "data.tokenizer must be a name or path")
    if is_int(d["batch_size"]) and is_int(t["grad_accum"]) and t["grad_accum"] >= 1:
        need(d["batch_size"] % t["grad_accum"] == 0,
             f"data.batch_size={d['batch_size']} must be divisible by train.grad_accum="
             f"{t['grad_accum']}")

    need(o["schedule"] in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, "
         f"got {o['schedule']!r}")
    need(o["wsd_decay_shape"] in WSD_DECAY_SHAPES,
         f"optim.wsd_decay_shape must be one of {WSD_DECAY_SHAPES}, got {o['wsd_decay_shape']!r}")
    for k in ("peak_lr",):
        need(_num(o[k]) and o[k] > 0, f"optim.{k} must be > 0, got {o[k]!r}")
    for k in ("end_lr", "init_lr", "weight_decay", "clip_norm", "eps"):
        need(_num(o[k]) and o[k] >= 0, f"optim.{k} must be >= 0, got {o[k]!r}")
    for k in ("b1", "b2"):
        need(_num(o[k]) and 0 <= o[k] < 1, f"optim.{k} must be in [0, 1), got {o[k]!r}")
    need(_num(o["wsd_decay_fraction"]) and 0 < o["wsd_decay_fraction"] <= 1,
         f"optim.wsd_decay_fraction must be in (0, 1], got {o['wsd_decay_fraction']!r}")
    if _num(o["peak_lr"]) and _num(o["end_lr"]) and o["end_lr"] > o["peak_lr"]:
        errors.append(f"optim.end_lr={o['end_lr']} must not exceed optim.peak_lr={o['peak_lr']}")
    total = o["decay_steps"] or t["steps"]
    if is_int(total) and is_int(o["warmup_steps"]) and o["schedule"] != "constant":
        need(o["warmup_steps"] <= total,
             f"optim.warmup_steps={o['warmup_steps']} exceeds the schedule length {total}")
    need(t["xla_triton_gemm"] in TRITON_GEMM_CHOICES, f"train.xla_triton_gemm must be one of "
         f"{TRITON_GEMM_CHOICES}, got {t['xla_triton_gemm']!r}")
    need(_num(t["peak_flops_per_device"]) and t["peak_flops_per_device"] >= 0,
         f"train.peak_flops_per_device must be >= 0, got {t['peak_flops_per_device']!r}")
    need(is_int(t["seed"]) and 0 <= t["seed"] < 2 ** 32,
         f"train.seed must be an integer in [0, 2**32), got {t['seed']!r}")
    try:
        parse_remat(t["remat"])
    except ValueError as e:
        errors.append(f"train.{e}")
    try:
        profile_range(t["profile_steps"])
    except ValueError as e:
        errors.append(str(e))

    need(is_int(m["fsdp"]) and m["fsdp"] >= 1, f"mesh.fsdp must be >= 1, got {m['fsdp']!r}")
    need(is_int(m["data"]) and (m["data"] >= 1 or m["data"] == -1),
         f"mesh.data must be >= 1 or -1 (all remaining devices), got {m['data']!r}")
    need(is_int(m["fsdp_min_size"]) and m["fsdp_min_size"] >= 0,
         f"mesh.fsdp_min_size must be >= 0, got {m['fsdp_min_size']!r}")
    need(isinstance(m["manual_data_parallel"], bool),
         f"mesh.manual_data_parallel must be True or False, got {m['manual_data_parallel']!r}")
    need(is_int(g["inject_nan_at_step"]), "debug.inject_nan_at_step must be an integer")
    need(is_int(g["kill_at_checkpoint"]), "debug.kill_at_checkpoint must be an integer")
    need(_num(g["step_delay"]) and g["step_delay"] >= 0, "debug.step_delay must be >= 0")

    mc = dict(cfg["model"])
    if not is_int(mc.get("vocab_size")) or mc["vocab_size"] < 0:
        errors.append(f"model.vocab_size must be 0 (from the tokenizer) or positive, got "
                      f"{mc.get('vocab_size')!r}")
    else:
        mc["vocab_size"] = mc["vocab_size"] or 257  # placeholder: the real one needs the tokenizer
        try:
            ModelConfig.from_dict(mc)
        except (ValueError, TypeError) as e:
            lines = str(e).splitlines()[1:] or [str(e)]
            errors.extend("model: " + line.strip() for line in lines)
    if not errors:  # inputs: tokenizer, data sources, chunk size (no file is read here)
        from mamba3_jax.training.preflight import static_errors
        errors.extend(static_errors(cfg))
    if errors:
        raise _config_error(errors)


def profile_range(spec: str) -> tuple[int, int] | None:
    """train.profile_steps "a:b" -> (a, b): trace steps a..b-1 (1-based); "" -> None."""
    if spec == "":
        return None
    try:
        a, b = (int(x) for x in str(spec).split(":"))
    except ValueError:
        a = b = 0
    if not 1 <= a < b:
        raise ValueError(f"train.profile_steps must be 'start:stop' with 1 <= start < stop "
                         f"(steps start..stop-1 are traced), got {spec!r}")
    return a, b


def _config_error(errors: list[str]) -> ConfigError:
    """One problem: one line; several: one per line."""
    if len(errors) == 1:
        return ConfigError(f"invalid config: {errors[0]}")
    return ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def model_config(config, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of a training config; vocab_size=0 is resolved from `vocab_size`."""
    mc = dict(to_dict(config)["model"])
    if not mc["vocab_size"]:
        if vocab_size is None:
            raise ConfigError("model.vocab_size=0 needs the tokenizer's vocab size")
        mult = int(to_dict(config)["data"]["vocab_multiple"])
        mc["vocab_size"] = int(math.ceil(vocab_size / mult) * mult)
    elif vocab_size is not None and mc["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size={mc['vocab_size']} is smaller than the tokenizer's "
                          f"vocab size {vocab_size}")
    return ModelConfig.from_dict(mc)


def schedule_steps(config) -> int:
    return int(config.optim.decay_steps or config.train.steps)
