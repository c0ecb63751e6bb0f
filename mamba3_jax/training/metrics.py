"""Metric sinks: JSONL file, TensorBoard (when installed) and a terminal progress line.

Every record is `{"step": int, "time": unix seconds, "<split>/<name>": float, ...}` with split
`train` or `eval`; the same names go to TensorBoard. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

METRICS_FILE = "metrics.jsonl"


def read_jsonl(path: str) -> list[dict]:
    """Records of a metrics file; a torn last line (a killed run) is skipped."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_after(path: str, step: int) -> int:
    """Drop records with step > `step` (a resumed run rewrites them). Returns records dropped."""
    records = read_jsonl(path)
    keep = [r for r in records if int(r.get("step", 0)) <= step]
    if len(keep) != len(records) or os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    return len(records) - len(keep)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf: keep them readable
    return v


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
                 progress: bool = True, total_steps: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = None
        self._tb = None
        self._progress = progress
        self._tty = progress and sys.stdout.isatty()
        self._start = time.time()
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str) -> dict:
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({f"{prefix}/{k}": _clean(v) for k, v in metrics.items() if v is not None})
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        return record

    def line(self, text: str, *, transient: bool = False) -> None:
        """Print a status line; on a terminal, transient lines overwrite each other."""
        if not self.enabled:
            return
        if self._tty and transient:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
        else:
            if self._tty:
                sys.stdout.write("\r\033[K")
            print(text, flush=True)

    def progress(self, step: int, m: dict) -> None:
        if not self._progress:  # train.progress=False: metrics.jsonl (and TensorBoard) only
            return
        total = self.total_steps or step
        frac = step / max(total, 1)
        width = 20
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        elapsed = time.time() - self._start
        parts = [f"[{bar}] {step}/{total}", f"loss {m['loss']:.4f}",
                 f"bpb {m['bits_per_byte']:.3f}", f"lr {m['lr']:.2e}",
                 f"gnorm {m['grad_norm']:.3f}"]
        if m.get("tokens_per_sec"):
            parts.append(f"{m['tokens_per_sec']:,.0f} tok/s")
        if m.get("mfu") is not None:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        if m.get("steps_per_sec") and total > step:
            parts.append(f"eta {_fmt_time((total - step) / m['steps_per_sec'])}")
        parts.append(f"elapsed {_fmt_time(elapsed)}")
        self.line(" | ".join(parts), transient=True)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tty and self.enabled:
            sys.stdout.write("\n")
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt_time(sec: float) -> str:
    sec = int(max(sec, 0))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _tensorboard_writer(logdir: str) -> Optional[object]:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore
        except ImportError:
            return None
    return SummaryWriter(logdir)
