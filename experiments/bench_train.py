r"""Training throughput: tokens/s, MFU, step time, compile time and peak memory per config.

    python experiments/bench_train.py                          # 180m, 1.5b, 180m_mimo, small_gpu
    python experiments/bench_train.py --configs 180m,1.5b --devices 1,2 --mesh dp,fsdp
    python experiments/bench_train.py --configs 180m --set train.remat=full \
        --set model.scan_backend=chunked
    python experiments/bench_train.py --smoke                  # CPU: a tiny model, a few steps

Each case (config x device count x mesh) runs in its own process (fresh device memory, its own
peak; a failure such as out-of-memory is one row, not the end of the table) through the real
`Trainer`: the jitted, donated train step of `mamba3_jax.training.step` with the config's
shardings, grad accumulation, chunked loss and remat. The batch is synthetic (random tokens of
the config's vocabulary, byte tokenizer, no data files needed); it is put on the devices every
step as the trainer does, and metrics are fetched one step late as the trainer does.

Batch: `--micro` sequences per device per microbatch (default per config, below) times
`--accum` microbatches, so the global batch grows with the device count (constant per-device
work: the scaling efficiency is tokens/s per device relative to one device). The paper's 0.5M
tokens per step is e.g. `--configs 180m --micro 32 --accum 8`; MFU barely depends on the
accumulation count (the optimizer runs once per step).

Reported per case: compile s (lower + compile of the train step; "of it lower s", the
lowering alone: JAX's share), first step s (compile + the first step, what a run waits before
its first log line), step ms (mean over the timed steps), tokens/s, tokens/s per device, MFU
(`mamba3_jax.training.flops`: model FLOPs only, no recompute), peak device memory (allocator
peak; `hlo GiB` is XLA's own estimate: arguments + temporaries),
the final loss (finite, ~ln V on random tokens) and the SSM backend used. Like the training
command, a config with `train.deterministic` (the default) runs with
`--xla_gpu_deterministic_ops=true`; `--set train.deterministic=False` measures without it;
`train.xla_triton_gemm` (`auto`: off with unrolled layers) adds
`--xla_gpu_enable_triton_gemm=false`.
The table is printed last; `$OUT/bench_train.json` and `$OUT/bench_train.md` get the rows when
`$OUT` is set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (config file, its argument, vocabulary of the real tokenizer padded as the config does,
#        per-device microbatch, microbatches). Sized for a few seconds per step on one H200.
CASES = {
    "180m": ("configs/paper.py", "180m", 100352, 32, 2),
    "1.5b": ("configs/paper.py", "1.5b", 100352, 8, 2),
    "180m_mimo": ("configs/paper.py", "180m_mimo", 100352, 32, 2),
    "1.5b_mimo": ("configs/paper.py", "1.5b_mimo", 100352, 8, 2),
    "small_gpu": ("configs/small_gpu.py", "siso", 50304, 32, 1),
    "small_gpu_mimo": ("configs/small_gpu.py", "mimo", 50304, 32, 1),
    # --smoke (CPU): a 2-layer byte model on short sequences
    "tiny": ("configs/tiny_cpu.py", "", 257, 2, 2),
}
DEFAULT_CONFIGS = "180m,1.5b,180m_mimo,small_gpu"
SMOKE_OVERRIDES = ("data.seq_len=64", "model.scan_layers=True", "train.remat=full",
                   "train.loss_chunk=32")


def load_config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("bench_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str):
    if text in ("True", "False"):  # Python spelling, as on the train command line
        return text == "True"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string, e.g. train.remat=full


def case_config(case: dict):
    """The training config of one case: the named config, synthetic-data settings, the batch of
    the case and the user's overrides."""
    path, arg, vocab, _, _ = CASES[case["config"]]
    c = load_config(path, arg)
    n, fsdp = case["devices"], case["devices"] if case["mesh"] == "fsdp" else 1
    c.model.vocab_size = vocab  # the real tokenizer's size; the tokens are random bytes-free ids
    c.data.tokenizer = "byte"  # no tokenizer or data files: the batch is synthetic
    c.data.train_source = {"kind": "text", "paths": [str(REPO / "README.md")]}
    c.data.batch_size = case["micro"] * n * case["accum"]
    c.train.grad_accum = case["accum"]
    c.train.steps = case["warmup"] + case["steps"] + 1
    c.train.eval_steps = 0
    c.train.tensorboard = c.train.progress = False
    c.optim.warmup_steps = 1
    c.mesh.data, c.mesh.fsdp = n // fsdp, fsdp
    for item in case["set"]:
        key, _, value = item.partition("=")
        sec, name = key.split(".", 1)
        c[sec][name] = _parse_value(value)
    return c


def synthetic_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """A batch in the pipeline's format: random tokens, every position a loss token."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(rows, seq_len + 1), dtype=np.int32)
    ones = np.ones((rows, seq_len), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
            "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
            "loss_mask": ones.astype(np.float32), "target_bytes": ones}


def run_case(case: dict) -> dict:
    """Compile and time one case in this process; returns its row."""
    import jax

    from mamba3_jax.backends import resolve
    from mamba3_jax.training import flops as flops_lib
    from mamba3_jax.training.trainer import Trainer

    config = case_config(case)
    devices = jax.devices()[:case["devices"]]
    if len(devices) < case["devices"]:
        raise RuntimeError(f"{case['devices']} devices wanted, {len(devices)} present")
    tr = Trainer(config, tempfile.mkdtemp(prefix="bench_train_"), devices=devices)
    rows = int(config.data.batch_size) // jax.process_count()
    host_batch = synthetic_batch(rows, int(config.data.seq_len), tr.model_cfg.vocab_size)
    state = tr.fresh_state()
    batch = tr.put_batch(host_batch)
    t0 = time.perf_counter()
    lowered = tr.train_step.lower(state, batch)  # tracing + StableHLO: JAX's share of compile s
    lower_s = time.perf_counter() - t0
    if case.get("trace_compile"):  # XLA's passes while it compiles (host trace events)
        from mamba3_jax.training import trace_summary

        compiled = []
        trace = trace_summary.traced(lambda: compiled.append(lowered.compile()))
        step, compile_trace = compiled[0], trace_summary.host_summary(trace)
    else:
        step, compile_trace = lowered.compile(), None
    compile_s = time.perf_counter() - t0
    state, m = step(state, batch)
    jax.block_until_ready(m)
    first_step_s = time.perf_counter() - t0
    for _ in range(case["warmup"]):
        state, m = step(state, tr.put_batch(host_batch))
    jax.block_until_ready((state, m))
    pending, t0 = None, time.perf_counter()
    for _ in range(case["steps"]):  # dispatch step s, then read step s-1's metrics (trainer)
        state, m = step(state, tr.put_batch(host_batch))
        if pending is not None:
            jax.device_get(pending)
        pending = m
    last = jax.device_get(pending)
    step_s = (time.perf_counter() - t0) / case["steps"]
    breakdown = profile_steps(step, state, lambda: tr.put_batch(host_batch),
                              case.get("profile", 0))

    tok_s = tr.tokens_per_step / step_s
    mfu = flops_lib.mfu(tok_s, tr.model_cfg, tr.peak_flops, len(devices), tr.seq_len)
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    mem = step.memory_analysis()
    hlo_bytes = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) if mem else None
    return {
        "config": case["config"], "devices": len(devices), "mesh": case["mesh"],
        "mesh_shape": dict(tr.mesh.shape), "set": case["set"],
        "device_kind": devices[0].device_kind, "jax": jax.__version__,
        "params": tr.model_cfg.num_params(), "scan_layers": tr.model_cfg.scan_layers,
        "remat": str(config.train.remat), "backend": resolve(tr.model_cfg.scan_backend)[0],
        "xla_deterministic": "--xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS",
                                                                                 ""),
        "xla_triton_gemm": "--xla_gpu_enable_triton_gemm=false" not in os.environ.get(
            "XLA_FLAGS", ""),
        "seq_len": int(config.data.seq_len), "micro_per_device": case["micro"],
        "grad_accum": case["accum"], "tokens_per_step": tr.tokens_per_step,
        "flops_per_token": tr.flops_per_token, "compile_s": round(compile_s, 2),
        "lower_s": round(lower_s, 2),
        "first_step_s": round(first_step_s, 2), "step_ms": round(1e3 * step_s, 2),
        "tokens_per_s": round(tok_s, 1), "tokens_per_s_per_device": round(tok_s / len(devices), 1),
        "mfu": None if mfu is None else round(mfu, 4),
        "peak_mem_gib": (round(max(peaks) / 2**30, 2) if all(p is not None for p in peaks)
                         else None),
        "hlo_mem_gib": None if hlo_bytes is None else round(hlo_bytes / 2**30, 2),
        "loss": float(last["loss"]), "timed_steps": case["steps"],
        **({"profile_ms_per_step": breakdown} if breakdown else {}),
        **({"compile_trace_top": compile_trace} if compile_trace else {}),
    }


def profile_steps(step, state, next_batch, n: int) -> dict:
    """n more steps under `jax.profiler`, then their device time per step by kind of work
    (`mamba3_jax.training.trace_summary`), top kernels included; {} for n = 0."""
    if not n:
        return {}
    import jax

    from mamba3_jax.training import trace_summary

    def run():
        nonlocal state
        for _ in range(n):
            state, m = step(state, next_batch())
        jax.block_until_ready((state, m))

    # BENCH_TRAIN_TRACE_DIR keeps the trace (e.g. for `trace_summary --top 80` on the machine)
    folder = os.environ.get("BENCH_TRAIN_TRACE_DIR") and tempfile.mkdtemp(
        dir=os.environ["BENCH_TRAIN_TRACE_DIR"])
    rows = trace_summary.trace_rows(run, folder)
    out = {k: round(us / 1e3 / n, 3) for k, us in trace_summary.by_kind(rows).items() if us}
    out["top"] = [[r.name[:60], r.kind, round(r.total_us / 1e3 / n, 3)] for r in rows[:12]]
    return out


def run_in_subprocess(case: dict, timeout: float) -> dict:
    from mamba3_jax.training.preflight import gpu_xla_flags

    # faulthandler: a crash in XLA (segfault) still prints the Python stack it happened under
    cmd = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--case",
           json.dumps(case)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # as `mamba3_jax.train` runs it (GPU flags: train.deterministic, train.xla_triton_gemm)
    env["XLA_FLAGS"] = gpu_xla_flags(env.get("XLA_FLAGS", ""), case_config(case))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**_ident(case), "error": f"timed out after {timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if os.environ.get("OUT"):  # the device machine sends $OUT back: keep the whole log
        name = f"{case['config']}_{case['devices']}_{case['mesh']}.err".replace("/", "_")
        Path(os.environ["OUT"], name).write_text(r.stderr or r.stdout or "")
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return {**_ident(case), "error": " | ".join(tail)[-300:] or f"exit code {r.returncode}"}


def _ident(case: dict) -> dict:
    return {"config": case["config"], "devices": case["devices"], "mesh": case["mesh"],
            "set": case["set"]}


def add_scaling(rows: list[dict]) -> None:
    """scaling = tokens/s per device relative to the same config and settings on one device."""
    base = {(r["config"], json.dumps(r["set"])): r.get("tokens_per_s_per_device")
            for r in rows if r["devices"] == 1 and "error" not in r}
    for r in rows:
        ref = base.get((r["config"], json.dumps(r["set"])))
        if "error" not in r and ref:
            r["scaling"] = round(r["tokens_per_s_per_device"] / ref, 3)


def table(rows: list[dict]) -> str:
    header = ["config", "dev", "mesh", "backend", "remat", "tokens/step", "compile s",
              "of it lower s", "first step s", "step ms", "tokens/s", "tok/s/dev", "MFU",
              "scaling", "peak GiB", "hlo GiB", "loss"]

    def fmt(v, spec=""):
        return "-" if v is None else format(v, spec)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        name = r["config"] + ("" if not r["set"] else " " + " ".join(r["set"]))
        if "error" in r:
            cells = [name, str(r["devices"]), r["mesh"], "error: " + r["error"]]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [name, str(r["devices"]), r["mesh"], r["backend"], r["remat"],
                     f"{r['tokens_per_step']:,}", fmt(r["compile_s"], ".1f"),
                     fmt(r.get("lower_s"), ".1f"), fmt(r["first_step_s"], ".1f"),
                     fmt(r["step_ms"], ".1f"),
                     f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_per_device']:,.0f}",
                     "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                     fmt(r.get("scaling"), ".2f"), fmt(r["peak_mem_gib"], ".1f"),
                     fmt(r["hlo_mem_gib"], ".1f"), f"{r['loss']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """Device ms per step by kind of work, one row per profiled case ('' when none was)."""
    profiled = [r for r in rows if r.get("profile_ms_per_step")]
    if not profiled:
        return ""
    from mamba3_jax.training.trace_summary import KINDS

    lines = ["", "", "Device time per step by kind of work (ms, `--profile`):", "",
             "| config | dev | mesh | " + " | ".join(KINDS) + " | total |",
             "|---" * (len(KINDS) + 4) + "|"]
    for r in profiled:
        b = r["profile_ms_per_step"]
        total = sum(v for k, v in b.items() if k in KINDS)
        lines.append(f"| {r['config']} | {r['devices']} | {r['mesh']} | "
                     + " | ".join(f"{b.get(k, 0.0):.1f}" for k in KINDS) + f" | {total:.1f} |")
    return "\n".join(lines)


def plan(args) -> list[dict]:
    configs = ["tiny"] if args.smoke else [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {', '.join(CASES)}")
    overrides = list(SMOKE_OVERRIDES if args.smoke else ()) + list(args.set)
    cases = []
    for name in configs:
        _, _, _, micro, accum = CASES[name]
        for n in (int(d) for d in args.devices.split(",")):
            for mesh in (args.mesh.split(",") if n > 1 else ["dp"]):
                if mesh not in ("dp", "fsdp"):
                    raise SystemExit(f"--mesh takes dp and/or fsdp, got {mesh!r}")
                cases.append({"config": name, "devices": n, "mesh": mesh,
                              "micro": args.micro or micro, "accum": args.accum or accum,
                              "warmup": args.warmup, "steps": args.steps, "set": overrides,
                              "profile": args.profile,
                              "trace_compile": args.trace_compile})
    return cases


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"from {', '.join(CASES)}")
    p.add_argument("--devices", default="1", help="device counts, e.g. 1,2")
    p.add_argument("--mesh", default="dp", help="with > 1 device: dp (data) and/or fsdp")
    p.add_argument("--micro", type=int, default=0, help="sequences per device per microbatch")
    p.add_argument("--accum", type=int, default=0, help="microbatches per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every case (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, trace N more steps: device ms per step by kind of work "
                   "and the top kernels, in each row's JSON (trace_summary)")
    p.add_argument("--trace_compile", action="store_true",
                   help="trace the compile and add XLA's largest host events (passes, their "
                   "seconds, nested totals overlap) to each row's JSON as compile_trace_top")
    p.add_argument("--smoke", action="store_true", help="tiny CPU model, 2 timed steps")
    p.add_argument("--in_process", action="store_true",
                   help="run the cases in this process (tests; peak memory then accumulates)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # child process: one case as JSON
    args = p.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return []
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 2), 0
    rows = []
    for case in plan(args):
        row = run_case(case) if args.in_process else run_in_subprocess(case, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    add_scaling(rows)
    text = table(rows) + profile_table(rows)
    print("\n" + text, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "bench_train.json").write_text(json.dumps(rows, indent=1) + "\n")
        Path(out, "bench_train.md").write_text(text + "\n")
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(1 if any("error" in r for r in rows) else 0)
