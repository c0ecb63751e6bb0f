"""Sweeps: expand `key=v1,v2,...` axes into runs, launch them, collect a results table and plot.

The command-line tool is `experiments/sweep.py`; this module holds the logic so that it can be
tested and reused. A sweep lives in one directory:

    <sweep_dir>/sweep.json          the spec (config, axes, fixed overrides, run names)
    <sweep_dir>/<run name>/         one training workdir per point (metrics.jsonl, summary.json)
    <sweep_dir>/results.md|.csv     one row per run
    <sweep_dir>/results.png         train loss and eval bits/byte curves of all runs
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Iterable, Optional, Sequence

from mamba3_jax.training.metrics import METRICS_FILE, read_jsonl


def parse_axis(spec: str) -> tuple[str, list[str]]:
    """'model.d_state=16,32' -> ('model.d_state', ['16', '32'])."""
    if "=" not in spec:
        raise ValueError(f"sweep axis {spec!r} must look like section.key=v1,v2,...")
    key, _, values = spec.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key):
        raise ValueError(f"sweep axis key {key!r} must be a dotted config path like model.d_state")
    vals = [v.strip() for v in values.split(",")]
    if not vals or any(v == "" for v in vals):
        raise ValueError(f"sweep axis {spec!r} has an empty value")
    if len(set(vals)) != len(vals):
        raise ValueError(f"sweep axis {spec!r} repeats a value")
    return key, vals


def parse_fixed(spec: str) -> tuple[str, str]:
    key, vals = parse_axis(spec)
    if len(vals) != 1:
        raise ValueError(f"fixed override {spec!r} must have exactly one value")
    return key, vals[0]


def expand(axes: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
    """Cartesian product of the axes, in order (the last axis varies fastest)."""
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"sweep axes repeat a key: {keys}")
    combos = itertools.product(*(v for _, v in axes))
    return [dict(zip(keys, combo, strict=True)) for combo in combos]


def run_name(point: dict[str, str]) -> str:
    """{'model.d_state': '16', 'model.mimo_rank': '4'} -> 'd_state=16+mimo_rank=4'.

    The key's last component is used unless two keys share it (then the full key)."""
    if not point:
        return "base"
    lasts = [k.rsplit(".", 1)[-1] for k in point]
    parts = []
    for (k, v), last in zip(point.items(), lasts, strict=True):
        name = last if lasts.count(last) == 1 else k
        parts.append(f"{name}={v}")
    return re.sub(r"[^\w.=+-]", "_", "+".join(parts))


def train_command(config: str, workdir: str, overrides: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "mamba3_jax.train", "--config", config, "--workdir", workdir]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    return cmd


def plan(config: str, sweep_dir: str, axes, fixed: Optional[dict[str, str]] = None) -> list[dict]:
    """[{name, workdir, overrides, point, command}] for every point of the sweep."""
    fixed = dict(fixed or {})
    runs = []
    for point in expand(axes):
        clash = set(point) & set(fixed)
        if clash:
            raise ValueError(f"keys both swept and fixed: {sorted(clash)}")
        name = run_name(point)
        workdir = os.path.join(sweep_dir, name)
        overrides = {**fixed, **point}
        runs.append({"name": name, "workdir": workdir, "point": point, "overrides": overrides,
                     "command": train_command(config, workdir, overrides)})
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names collide: {names}")
    return runs


def write_spec(sweep_dir: str, config: str, axes, fixed, runs) -> None:
    os.makedirs(sweep_dir, exist_ok=True)
    spec = {"config": config, "axes": [[k, v] for k, v in axes], "fixed": fixed,
            "runs": [{"name": r["name"], "point": r["point"]} for r in runs]}
    with open(os.path.join(sweep_dir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)


def shell_line(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n): this process takes every n-th cell (or run) of a plan from the i-th
    (one process per GPU sharing the output folder)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard takes i/n (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise SystemExit(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def is_complete(workdir: str) -> bool:
    path = os.path.join(workdir, "summary.json")
    cfg_path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and os.path.exists(cfg_path)):
        return False
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    with open(cfg_path, encoding="utf-8") as f:
        steps = json.load(f)["train"]["steps"]
    return int(summary.get("step", 0)) >= int(steps)


def run_all(runs: Iterable[dict], *, keep_going: bool = True, skip_complete: bool = True,
            echo=print, deadline: Optional[float] = None) -> dict[str, int]:
    """Launch the runs one after another (output to <workdir>/train.log). Returns exit codes.

    deadline (a time.time() value): start a run only while the time left exceeds the longest
    run so far (a machine lent for a fixed time: a run cut off there would be lost).
    SIGTERM to this process (e.g. `timeout -s TERM`) is passed on to the running training,
    which checkpoints and stops (the same command resumes it); after it, or Ctrl-C, no run
    starts. SIGINT is not passed on: a terminal's Ctrl-C reaches the training itself (one process
    group), and a second SIGINT would stop it without its checkpoint."""
    codes, longest = {}, 0.0
    current: dict = {"proc": None, "signal": None}

    def forward(signum, frame):
        current["signal"] = signum
        if (signum == signal.SIGTERM and current["proc"] is not None
                and current["proc"].poll() is None):
            current["proc"].send_signal(signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for r in runs:
            if current["signal"] is not None:
                break
            if skip_complete and is_complete(r["workdir"]):
                echo(f"[sweep] {r['name']}: complete, skipped")
                codes[r["name"]] = 0
                continue
            if deadline is not None and time.time() + longest > deadline:
                echo(f"[sweep] {r['name']}: not started, {deadline - time.time():.0f} s left "
                     f"and the longest run took {longest:.0f} s")
                break
            started = time.time()
            os.makedirs(r["workdir"], exist_ok=True)
            echo(f"[sweep] {r['name']}: {shell_line(r['command'])}")
            with open(os.path.join(r["workdir"], "train.log"), "a", encoding="utf-8") as log:
                current["proc"] = subprocess.Popen(r["command"], stdout=log,
                                                   stderr=subprocess.STDOUT)
                returncode = current["proc"].wait()
                current["proc"] = None
            codes[r["name"]] = returncode
            longest = max(longest, time.time() - started)
            echo(f"[sweep] {r['name']}: exit code {returncode}")
            if returncode and not keep_going:
                break
        if current["signal"] is not None:
            echo(f"[sweep] stopped by signal {current['signal']}: the run in progress "
                 "checkpointed; the same command goes on from there")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return codes


# ----------------------------------------------------------------------------- results


def _last(records: list[dict], key: str):
    for r in reversed(records):
        if key in r and isinstance(r[key], (int, float)):
            return r[key], r["step"]
    return None, None


def summarize_run(name: str, workdir: str, point: Optional[dict] = None) -> dict:
    records = read_jsonl(os.path.join(workdir, METRICS_FILE))
    row: dict = {"run": name}
    row.update(point or {})
    summary_path = os.path.join(workdir, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    train_loss, step = _last(records, "train/loss")
    eval_bpb, _ = _last(records, "eval/bits_per_byte")
    eval_loss, _ = _last(records, "eval/loss")
    evals = [r["eval/bits_per_byte"] for r in records
             if isinstance(r.get("eval/bits_per_byte"), (int, float))]
    speeds = [r["train/tokens_per_sec"] for r in records
              if isinstance(r.get("train/tokens_per_sec"), (int, float))]
    mfus = [r["train/mfu"] for r in records if isinstance(r.get("train/mfu"), (int, float))]
    row.update({
        "status": ("complete" if summary and is_complete(workdir)
                   else "missing" if not records else "incomplete"),
        "params_M": round(summary["params"] / 1e6, 3) if "params" in summary else None,
        "step": step,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "eval_bpb": eval_bpb,
        "best_eval_bpb": min(evals) if evals else None,
        "tokens_per_sec": (sum(speeds) / len(speeds)) if speeds else None,
        "mfu": (sum(mfus) / len(mfus)) if mfus else None,
        "wall_time_sec": summary.get("wall_time_sec"),
    })
    return row


def collect(runs: Sequence[dict]) -> list[dict]:
    return [summarize_run(r["name"], r["workdir"], r.get("point")) for r in runs]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def markdown_table(rows: Sequence[dict]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict]) -> str:
    cols = columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return buf.getvalue()


def plot(runs: Sequence[dict], path: str) -> Optional[str]:
    """Train loss and eval bits/byte against step, one line per run. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        recs = read_jsonl(os.path.join(r["workdir"], METRICS_FILE))
        tr = [(x["step"], x["train/loss"]) for x in recs
              if isinstance(x.get("train/loss"), (int, float))]
        ev = [(x["step"], x["eval/bits_per_byte"]) for x in recs
              if isinstance(x.get("eval/bits_per_byte"), (int, float))]
        if tr:
            ax1.plot(*zip(*tr, strict=True), label=r["name"])
        if ev:
            ax2.plot(*zip(*ev, strict=True), marker="o", label=r["name"])
    ax1.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    ax2.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(runs: Sequence[dict], sweep_dir: str) -> dict[str, str]:
    rows = collect(runs)
    os.makedirs(sweep_dir, exist_ok=True)
    out = {"md": os.path.join(sweep_dir, "results.md"),
           "csv": os.path.join(sweep_dir, "results.csv")}
    with open(out["md"], "w", encoding="utf-8") as f:
        f.write(markdown_table(rows))
    with open(out["csv"], "w", encoding="utf-8") as f:
        f.write(csv_text(rows))
    png = plot(runs, os.path.join(sweep_dir, "results.png"))
    if png:
        out["png"] = png
    return out
