"""Timing and roofline helpers shared by the benchmark scripts (GPU machine)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(fn: Callable, arg_sets: Sequence[tuple], reps: int = 20, warmup: int = 2) -> float:
    """Median milliseconds of fn(*args), cycling through several argument sets (cache-cold)."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    times = []
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    xs = [jnp.full((n,), float(i), jnp.float32) for i in range(2)]
    copy = jax.jit(lambda a: a * 1.0001)
    ms = time_fn(copy, [(x,) for x in xs], reps=20)
    return 2 * n * 4 / (ms * 1e-3)


def measure_matmul_rate(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """Dense matmul rate in FLOP/s at the given dtype."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    mats = [(jax.random.normal(keys[i], (n, n), dtype), jax.random.normal(keys[i + 1], (n, n),
                                                                          dtype)) for i in (0, 2)]
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
    ms = time_fn(mm, mats, reps=20)
    return 2 * n ** 3 / (ms * 1e-3)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:  # not a git checkout (e.g. a copied tree)
        return "unknown"


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def tree_nbytes(tree) -> int:
    """Bytes held by the arrays (or ShapeDtypeStructs) of a pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def publish(intro: str, table: str, *, out_name: str, section: str, write_docs: bool,
            doc_preamble: str = "") -> None:
    """Print a benchmark's result, copy it to $OUT/<out_name> when $OUT is set (the device
    machine sends that folder back), and with `write_docs` replace its docs/benchmarks.md
    section (`doc_preamble` first)."""
    text = intro + "\n\n" + table
    print("\n" + text, flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, out_name).write_text(text + "\n")
    if write_docs:
        replace_doc_section(section, doc_preamble + text)


def replace_doc_section(title: str, body: str, path: Optional[Path] = None) -> None:
    """Replace the Markdown section starting at `title` (up to the next '## ') in
    docs/benchmarks.md with `title` + `body`, or append it when absent."""
    path = path or Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    section = title + "\n\n" + body.strip("\n") + "\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
