"""Input checks that run before any training work, each failure one line naming what is wrong.

`static_errors(cfg)` looks only at the config (tokenizer name, source kinds, splits and options,
chunk_size against seq_len): `validate` calls it, so `--print_config` catches these too.
`load_inputs(config)` builds the tokenizer and the data sources (reading the files) and
`check_backend(config)` asks the backend registry for a kernel on this platform; the trainer runs
both before it compiles anything. `gpu_warning(...)` flags a GPU-sized config on a CPU.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping, Optional

from mamba3_jax.training.config import ConfigError

# Source options that `get_source` translates before calling the constructor.
_TRANSLATED_OPTIONS = {"text": ("doc_separator_regex",)}
# Assumed sustained CPU throughput for the warning below (a few cores, f32): an order of magnitude.
_CPU_FLOPS = 1e11
_SLOW_STEP_SEC = 10.0


def _source_factories() -> dict[str, Any]:
    from mamba3_jax.data import sources as s

    return {"books": s.BooksSource, "tinyshakespeare": s.tinyshakespeare_source,
            "text": s.TextFileSource, "jsonl": s.JsonlSource, "parquet": s.ParquetSource,
            "arrayrecord": s.ArrayRecordSource, "array_record": s.ArrayRecordSource}


def source_spec_errors(name: str, spec: Mapping) -> list[str]:
    """Problems of one source spec that need no file access: kind, split, option names."""
    from mamba3_jax.data.sources import BOOK_SPLITS, SOURCE_KINDS, TINYSHAKESPEARE_FRACTIONS

    spec = {k: v for k, v in dict(spec).items() if v is not None}
    kind = spec.pop("kind", None)
    factories = _source_factories()
    if kind not in factories:
        return [f"data.{name}.kind={kind!r} is not a source kind; valid: {', '.join(SOURCE_KINDS)}"]
    splits = {"books": BOOK_SPLITS, "tinyshakespeare": tuple(TINYSHAKESPEARE_FRACTIONS)}.get(kind)
    if splits and spec.get("split", "train") not in splits:
        return [f"data.{name}.split={spec['split']!r} is not a {kind} split; valid: "
                f"{', '.join(splits)}"]
    for opt in _TRANSLATED_OPTIONS.get(kind, ()):
        spec.pop(opt, None)
    params = inspect.signature(factories[kind]).parameters
    try:
        inspect.signature(factories[kind]).bind(**spec)
    except TypeError as e:
        return [f"data.{name} (kind {kind!r}): {e}; options: {', '.join(params)}"]
    return []


def tokenizer_error(name: Any) -> Optional[str]:
    from mamba3_jax.data.tokenizers import TIKTOKEN_ENCODINGS, TOKENIZER_NAMES

    if not isinstance(name, str) or not name:
        return None  # validate() reports the type
    if name == "byte" or name in TIKTOKEN_ENCODINGS:
        return None
    if name.endswith("tokenizer.json"):
        if not os.path.isfile(os.path.expanduser(name)):
            return f"data.tokenizer: file not found: {name!r}"
        return None
    return f"data.tokenizer={name!r} is not a tokenizer; valid: {', '.join(TOKENIZER_NAMES)}"


def static_errors(cfg: Mapping) -> list[str]:
    """Every problem of the data inputs and the chunk size visible in the config alone."""
    d, m = cfg["data"], cfg["model"]
    errors = []
    err = tokenizer_error(d["tokenizer"])
    if err:
        errors.append(err)
    for name in ("train_source", "eval_source"):
        if name == "eval_source" and not cfg["train"]["eval_steps"]:
            continue  # never read
        if isinstance(d[name], Mapping) and d[name].get("kind"):
            errors.extend(source_spec_errors(name, d[name]))
    chunk, seq = m.get("chunk_size"), d["seq_len"]
    if isinstance(chunk, int) and isinstance(seq, int) and chunk > seq:
        errors.append(f"model.chunk_size={chunk} exceeds data.seq_len={seq}: every sequence "
                      f"would be padded to a full chunk; use chunk_size <= {seq}")
    return errors


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 400 else text[:400] + " ..."


def _empty_files(source) -> list[str]:
    return [str(p) for p in getattr(source, "paths", ()) if os.path.getsize(p) == 0]


def load_source(name: str, spec: Mapping):
    """Build a source and read its first and last document, so that a missing, empty, corrupt or
    non-UTF-8 file is reported now (naming it) rather than in the middle of training."""
    from mamba3_jax.data.sources import get_source

    try:
        source = get_source(spec)
        n = len(source)
        if n:
            source[0], source[n - 1]  # noqa: B018  (decode errors surface here)
    except Exception as e:  # any failure to read an input is a problem of that input
        raise ConfigError(f"data.{name} {dict(spec)}: {_one_line(e)}") from e
    if not n:
        empty = _empty_files(source)
        raise ConfigError(f"data.{name} {dict(spec)} has no documents"
                          + (f" (empty files: {', '.join(empty)})" if empty else ""))
    return source


def load_inputs(config):
    """(tokenizer, train source, eval source or None) of a config, or ConfigError."""
    from mamba3_jax.data.tokenizers import get_tokenizer
    from mamba3_jax.training.data import source_spec

    d = config.data
    try:
        tokenizer = get_tokenizer(d.tokenizer)
    except Exception as e:  # missing files, a broken tokenizer.json, a missing library
        raise ConfigError(f"data.tokenizer={d.tokenizer!r}: {_one_line(e)}") from e
    train_source = load_source("train_source", source_spec(d.train_source))
    eval_source = None
    if int(config.train.eval_steps):
        eval_source = load_source("eval_source", source_spec(d.eval_source))
    return tokenizer, train_source, eval_source


def check_backend(config) -> None:
    """ConfigError if the configured scan backend has no implementation on this platform."""
    from mamba3_jax import backends

    name = config.model.scan_backend
    try:
        backends.resolve(name)
    except (backends.Unsupported, ValueError) as e:
        raise ConfigError(f"model.scan_backend={name!r}: {_one_line(e)}") from e


def gpu_warning(platform: str, model_cfg, tokens_per_step: int,
                flops_per_token: float) -> Optional[str]:
    """A warning when a config made for accelerators is about to run on a CPU, else None."""
    if platform != "cpu":
        return None
    reasons = []
    if model_cfg.dtype in ("bfloat16", "float16"):
        reasons.append(f"{model_cfg.dtype} compute")
    if str(model_cfg.scan_backend).startswith("pallas") and "interpret" not in \
            str(model_cfg.scan_backend):
        reasons.append(f"scan_backend={model_cfg.scan_backend}")
    step_sec = tokens_per_step * flops_per_token / _CPU_FLOPS
    if step_sec > _SLOW_STEP_SEC:
        reasons.append(f"{tokens_per_step * flops_per_token / 1e12:.1f} TFLOP per step, "
                       f"roughly {step_sec:.0f} s per step here")
    if not reasons:
        return None
    return ("this config looks made for a GPU (" + "; ".join(reasons) + ") but JAX sees only "
            "CPU devices: install jax[cuda] on a GPU machine, or train a CPU config "
            "(configs/tiny_cpu.py)")


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def gpu_plugin_installed() -> bool:
    """A CUDA or ROCm jax plugin is importable (checked without initialising jax)."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in
               ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                "jax_rocm7_plugin"))


def _with_flag(xla_flags: str, name: str, value: str) -> str:
    """XLA_FLAGS with `name=value` added, unless `name` is set either way already (kept)."""
    if name in xla_flags:
        return xla_flags
    return (xla_flags + f" {name}={value}").strip()


def with_deterministic_flag(xla_flags: str) -> str:
    """XLA_FLAGS with the GPU determinism flag added (unless it is set either way already)."""
    return _with_flag(xla_flags, "--xla_gpu_deterministic_ops", "true")


def gpu_xla_flags(xla_flags: str, config) -> str:
    """XLA_FLAGS for a GPU training run of `config`, set before jax starts: the determinism flag
    (`train.deterministic`) and XLA's Triton GEMM fusions off where `train.xla_triton_gemm` says
    so ("off"; "auto": with unrolled layers, where cuBLAS for every matmul took the 1.5B step
    from 748 to 716 ms on an H200, docs/benchmarks.md). A flag the caller set either way is
    kept."""
    train = config.train
    if train.deterministic:
        xla_flags = with_deterministic_flag(xla_flags)
    choice = train.xla_triton_gemm
    if choice == "auto":
        choice = "on" if config.model.get("scan_layers", False) else "off"
    if choice == "off":
        xla_flags = _with_flag(xla_flags, "--xla_gpu_enable_triton_gemm", "false")
    return xla_flags


def determinism_warning(deterministic: bool, platform: str) -> Optional[str]:
    """A warning when train.deterministic is on for a GPU whose XLA lacks the flag (jax was
    initialised before the flag could be set, e.g. Trainer used inside another program)."""
    if not deterministic or platform not in ("gpu", "cuda", "rocm"):
        return None
    if "--xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", ""):
        return None
    return (f"train.deterministic=True but XLA_FLAGS lacks {DETERMINISTIC_XLA_FLAG} (set it "
            "before jax starts): a resumed run may differ from an uninterrupted one in the last "
            "bits")
