"""Timing and roofline helpers shared by the benchmark scripts (GPU machine).

Ceilings (`measure_ceilings`): the copy bandwidth is the fastest of several device copies (JAX
ways and, in the same process when importable, torch `clone()` / `copy_()` and a cupy
device-to-device memcpy), the matmul rate the fastest 8192^3 bf16 matmul. An elementwise XLA
kernel (x + 1) is also timed and reported: it runs ~25% below a real copy on an H200, so floors
over it were too lenient. `python -m mamba3_jax.benchmark` prints every method's rate.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

# Before JAX's GPU backend starts: JAX otherwise takes most of the device memory up front, and
# the torch / cupy copies of `measure_ceilings` then fail for lack of memory (an H200 run of
# bench_decode fell back to JAX's 3.81 TB/s copy where torch measures 4.25 TB/s).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


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


# The paper's device, for comparing its figures as fractions of their own floors: an H100 SXM's
# device-to-device copy measured ~3.0 TB/s (read + written) in this project's earlier runs, and
# its dense bf16 matmul ~790 TFLOP/s (8192^3). Assumptions, not measured in the same run.
H100_COPY_BYTES_PER_S = 3.0e12
H100_MATMUL_FLOPS = 790e12


def roofline_s(nbytes: float, flops: float, copy_rate: float, matmul_rate: float) -> float:
    """Fewest seconds to move `nbytes` (read + written) and do `flops`: the slower of the two,
    each at its ceiling (they overlap at best)."""
    return max(nbytes / copy_rate, flops / matmul_rate)


def percent_of_floor(seconds: float, floor_s: float) -> float:
    """How close a time is to its floor: 100 means at the roofline."""
    return 100.0 * floor_s / seconds


@dataclass(frozen=True)
class Ceilings:
    """Rates measured on this device: `copy` is the fastest copy (bytes read + written per
    second) among `copies`, `matmul` the fastest large bf16 matmul (FLOP/s) among `matmuls`.
    The dicts map each method to its rate, or to a string saying why it gave none."""

    copy: float
    matmul: float
    copies: dict = field(default_factory=dict)
    matmuls: dict = field(default_factory=dict)

    def floor_s(self, nbytes: float = 0.0, flops: float = 0.0) -> float:
        return roofline_s(nbytes, flops, self.copy, self.matmul)

    def summary(self) -> str:
        return (f"copy {self.copy / 1e12:.3f} TB/s ({_best(self.copies)}), bf16 matmul "
                f"{self.matmul / 1e12:.0f} TFLOP/s ({_best(self.matmuls)})")

    def detail(self) -> str:
        """Every method tried, one per line (rates or why not)."""
        lines = []
        for kind, d, unit, scale in (("copy", self.copies, "TB/s", 1e12),
                                     ("matmul", self.matmuls, "TFLOP/s", 1e12)):
            for name, v in d.items():
                val = f"{v / scale:.3f} {unit}" if isinstance(v, float) else v
                lines.append(f"  {kind:6s} {name}: {val}")
        return "\n".join(lines)


def _best(rates: dict) -> str:
    measured = {k: v for k, v in rates.items() if isinstance(v, float)}
    return max(measured, key=measured.get) if measured else "none"


def _rate(launch: Callable[[], object], sync: Callable[[object], object], work: float,
          reps: int, inner: int) -> float:
    """work / (median seconds per launch); each sample times `inner` back-to-back launches so
    host dispatch overlaps device work."""
    for _ in range(2):  # compile, warm caches
        sync(launch())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = launch()
        sync(out)
        times.append((time.perf_counter() - t0) / inner)
    return work / float(np.median(times))


def _jax_copies(nbytes: int, reps: int, inner: int) -> dict:
    """Device copies through JAX, each (fn, donates its input, writes in place). An output that
    shares the input's buffer without being an in-place update made no copy (XLA aliases a
    donated identity): reported as such, not as a rate."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    plus1 = lambda a: a + jnp.asarray(1, a.dtype)  # noqa: E731
    methods = {
        "jax jit(jnp.copy)": (jax.jit(jnp.copy), False, False),
        "jax jit(x * 1) bf16": (jax.jit(lambda a: a * jnp.asarray(1, a.dtype)), False, False),
        "jax device_put(may_alias=False)": (lambda a: jax.device_put(a, may_alias=False),
                                            False, False),
        "jax donated identity": (jax.jit(lambda a: a, donate_argnums=0), True, False),
        "jax donated in-place x + 1": (jax.jit(plus1, donate_argnums=0), True, True),
        "jax x + 1 (an elementwise kernel, as the old ceiling)": (jax.jit(plus1), False, False),
    }
    out: dict = {}
    for name, (fn, donated, in_place) in methods.items():
        try:
            src = jnp.copy(x) if donated else x
            ptr = _buffer(src)
            y = fn(src)
            if not in_place and ptr is not None and _buffer(y) == ptr:
                out[name] = "no copy made (output aliases the input)"
                continue
            if donated:  # feed each output back in as the next (donated) input
                box = [y]

                def launch(fn=fn, box=box):
                    box[0] = fn(box[0])
                    return box[0]
            else:
                def launch(fn=fn):
                    return fn(x)
            out[name] = _rate(launch, jax.block_until_ready, 2.0 * nbytes, reps, inner)
        except Exception as e:  # a method this jax or device lacks
            out[name] = f"failed: {type(e).__name__}: {str(e)[:80]}"
    return out


def _buffer(x) -> Optional[int]:
    try:
        return x.unsafe_buffer_pointer()
    except Exception:  # a backend without raw pointers: no aliasing check
        return None


def _torch_copies(nbytes: int, reps: int, inner: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"torch": "no CUDA device for torch"}
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    sync = lambda _: torch.cuda.synchronize()  # noqa: E731
    out = {"torch clone()": _rate(x.clone, sync, 2.0 * nbytes, reps, inner),
           "torch copy_()": _rate(lambda: y.copy_(x), sync, 2.0 * nbytes, reps, inner)}
    x = y = None  # release before emptying the cache (the lambdas hold these cells)
    torch.cuda.empty_cache()
    return out


def _cupy_copies(nbytes: int, reps: int, inner: int) -> dict:
    import cupy as cp

    x = cp.ones(nbytes, dtype=cp.uint8)
    y = cp.empty_like(x)
    stream = cp.cuda.get_current_stream()
    rate = _rate(lambda: y.data.copy_from_device_async(x.data, nbytes, stream),
                 lambda _: stream.synchronize(), 2.0 * nbytes, reps, inner)
    x = y = None  # release before emptying the cache (the lambdas hold these cells)
    cp.get_default_memory_pool().free_all_blocks()
    return {"cupy memcpy device-to-device": rate}


def _torch_matmul(n: int, reps: int, inner: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"torch": "no CUDA device for torch"}
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    rate = _rate(lambda: a @ b, lambda _: torch.cuda.synchronize(), 2.0 * n ** 3, reps, inner)
    a = b = None
    torch.cuda.empty_cache()
    return {f"torch a @ b bf16 {n}^3": rate}


def _external(lib: str, fn: Callable[..., dict], *args) -> dict:
    """Rates from another library in this process, on the same GPU as JAX; only when JAX runs
    on a GPU and the library imports (the reason otherwise)."""
    if jax.default_backend() not in ("gpu", "cuda"):
        return {lib: f"skipped: JAX runs on {jax.default_backend()}"}
    try:
        return fn(*args)
    except ImportError:
        return {lib: "not importable"}
    except Exception as e:
        return {lib: f"failed: {type(e).__name__}: {str(e)[:80]}"}


def _libs() -> tuple[str, ...]:
    # MAMBA3_CEILING_LIBS="" keeps torch and cupy out of the process (should one misbehave)
    return tuple(s for s in os.environ.get("MAMBA3_CEILING_LIBS", "torch,cupy").split(",") if s)


def measure_copy_rates(nbytes: int = 1 << 30, reps: int = 10, inner: int = 5) -> dict:
    """{method: bytes/s (read + written) or why not} for copies of an nbytes buffer: several
    JAX ways and, when importable in this process, torch and cupy device-to-device copies."""
    rates = _jax_copies(nbytes, reps, inner)
    if "torch" in _libs():
        rates.update(_external("torch", _torch_copies, nbytes, reps, inner))
    if "cupy" in _libs():
        rates.update(_external("cupy", _cupy_copies, nbytes, reps, inner))
    return rates


def measure_matmul_rates(n: int = 8192, reps: int = 10, inner: int = 5) -> dict:
    """{method: FLOP/s or why not} of an n x n x n bf16 matmul (f32 accumulation): JAX and,
    when importable, torch."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    mm = jax.jit(jnp.matmul)
    rates: dict = {f"jax matmul bf16 {n}^3": _rate(lambda: mm(a, b), jax.block_until_ready,
                                                   2.0 * n ** 3, reps, inner)}
    a = b = None
    if "torch" in _libs():
        rates.update(_external("torch", _torch_matmul, n, reps, inner))
    return rates


def measure_ceilings(copy_bytes: int = 1 << 30, matmul_n: int = 8192, reps: int = 10) -> Ceilings:
    """The device's honest ceilings: its fastest copy and its fastest large bf16 matmul."""
    copies = measure_copy_rates(copy_bytes, reps)
    matmuls = measure_matmul_rates(matmul_n, reps)
    best = lambda d: max(v for v in d.values() if isinstance(v, float))  # noqa: E731
    return Ceilings(copy=best(copies), matmul=best(matmuls), copies=copies, matmuls=matmuls)


def announce_ceilings(smoke: bool = False) -> Ceilings:
    """The benchmarks' preamble: measure the ceilings (tiny under `smoke`) and print them with
    the device, jax version and commit."""
    ceil = measure_ceilings((1 << 22) if smoke else (1 << 30), 256 if smoke else 8192,
                            reps=3 if smoke else 10)
    print(f"{device_name()}, jax {jax.__version__}, commit {git_commit()}; ceilings: "
          f"{ceil.summary()}\n{ceil.detail()}", flush=True)
    return ceil


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """The fastest device copy's bytes/s (read + written); see measure_copy_rates."""
    return max(v for v in measure_copy_rates(nbytes).values() if isinstance(v, float))


def measure_matmul_rate(n: int = 8192) -> float:
    """The fastest n^3 bf16 matmul's FLOP/s; see measure_matmul_rates."""
    return max(v for v in measure_matmul_rates(n).values() if isinstance(v, float))


class CompileWatch:
    """Counts XLA compilations (and their seconds) while active: a benchmark's timed region
    should have none. `with CompileWatch() as w: ...; w.count, w.seconds, w.what` (`what`:
    the compiled functions with their argument shapes, from jax's compile log)."""

    _active: list = []
    _registered = False
    _LOGGERS = ("jax._src.interpreters.pxla", "jax._src.dispatch")

    class _Names(logging.Handler):
        def __init__(self, sink: list):
            super().__init__(logging.WARNING)
            self.sink = sink

        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Compiling "):
                self.sink.append(msg.split(". Argument mapping")[0][len("Compiling "):][:300])

    def __enter__(self):
        if not CompileWatch._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileWatch._on_event)
            CompileWatch._registered = True
        self.count, self.seconds, self.what = 0, 0.0, []
        CompileWatch._active.append(self)
        self._handler = CompileWatch._Names(self.what)
        # jax's compile log, read by our handler and kept off the console
        self._loggers = [logging.getLogger(n) for n in CompileWatch._LOGGERS]
        self._propagate = [lg.propagate for lg in self._loggers]
        for lg in self._loggers:
            lg.addHandler(self._handler)
            lg.propagate = False
        self._log = jax.log_compiles(True)
        self._log.__enter__()
        return self

    def __exit__(self, *exc):
        self._log.__exit__(*exc)
        for lg, prop in zip(self._loggers, self._propagate, strict=True):
            lg.removeHandler(self._handler)
            lg.propagate = prop
        CompileWatch._active.remove(self)

    @staticmethod
    def _on_event(name, seconds, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            for w in CompileWatch._active:
                w.count += 1
                w.seconds += seconds


def git_commit() -> str:
    """$MAMBA3_COMMIT when set (a device machine's copy of the tree may carry stale git
    metadata: set it to the local HEAD in the call), else the checkout's short HEAD."""
    if os.environ.get("MAMBA3_COMMIT"):
        return os.environ["MAMBA3_COMMIT"]
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
        replace_doc_section(section, text, preamble=doc_preamble)


GENERATED_BEGIN, GENERATED_END = "<!-- generated -->", "<!-- end generated -->"


def replace_doc_section(title: str, body: str, path: Optional[Path] = None,
                        preamble: str = "") -> None:
    """Put `body` into the Markdown section starting at `title` (up to the next '## ') of
    docs/benchmarks.md: between its GENERATED_BEGIN / GENERATED_END markers when it has them (the
    section's hand-written text around them stays), else as the whole section after
    `preamble`; appended as a new section when absent."""
    path = path or Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    generated = GENERATED_BEGIN + "\n" + body.strip("\n") + "\n" + GENERATED_END
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(title)
    whole = title + "\n\n" + (preamble.strip("\n") + "\n\n" if preamble else "") + generated
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + whole + "\n")
        return
    end = text.find("\n## ", start + len(title))
    end = len(text) if end < 0 else end
    section = text[start:end]
    a, b = section.find(GENERATED_BEGIN), section.find(GENERATED_END)
    if 0 <= a < b:
        section = section[:a] + generated + section[b + len(GENERATED_END):]
    else:
        section = whole + "\n"
    path.write_text(text[:start] + section + text[end:])


if __name__ == "__main__":  # python -m mamba3_jax.benchmark [--smoke]: the ceilings only
    import sys

    smoke = "--smoke" in sys.argv
    c = measure_ceilings((1 << 22) if smoke else (1 << 30), 256 if smoke else 8192,
                         reps=3 if smoke else 10)
    print(f"{device_name()}, jax {jax.__version__}: {c.summary()}\n{c.detail()}")
