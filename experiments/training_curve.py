"""One training run's curve and its stability check (issue 11: a falling loss, no gradient-norm
spikes), from the run's metrics.jsonl, as results.md, results.csv, plot.png and configs.json.

    python experiments/training_curve.py runs/180m --out experiments/results/curve_180m \
        [--spike_factor 4] [--window 20]

A spike is a step whose gradient norm exceeds `--spike_factor` times the median of the
`--window` steps before it (logged steps; the first window only sets the baseline). "Falling"
compares the mean train loss of the first and the last tenth of the logged steps. The run's
config.json (written by the trainer beside the metrics) goes into configs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import write_report  # noqa: E402

from mamba3_jax.training.metrics import METRICS_FILE, read_jsonl  # noqa: E402


def load_curve(workdir: str) -> dict:
    """Per logged step: train loss and grad norm; per eval step: eval bits per byte."""
    records = read_jsonl(os.path.join(workdir, METRICS_FILE))
    train = sorted((int(r["step"]), r["train/loss"], r.get("train/grad_norm", float("nan")))
                   for r in records if "train/loss" in r)
    evals = sorted((int(r["step"]), r["eval/bits_per_byte"])
                   for r in records if "eval/bits_per_byte" in r)
    if not train:
        raise SystemExit(f"{workdir}: no train/loss records in {METRICS_FILE}")
    return {"steps": np.array([s for s, _, _ in train]),
            "loss": np.array([x for _, x, _ in train], float),
            "grad_norm": np.array([g for _, _, g in train], float),
            "eval_steps": np.array([s for s, _ in evals]),
            "eval_bpb": np.array([b for _, b in evals], float)}


def spikes(grad_norm: np.ndarray, factor: float, window: int) -> list[int]:
    """Indices whose grad norm > factor x the median of the `window` entries before them."""
    out = []
    for i in range(window, len(grad_norm)):
        base = np.median(grad_norm[i - window:i])
        if np.isfinite(grad_norm[i]) and grad_norm[i] > factor * base:
            out.append(i)
    return out


def summary(curve: dict, factor: float, window: int) -> dict:
    loss = curve["loss"]
    tenth = max(1, len(loss) // 10)
    first, last = float(np.mean(loss[:tenth])), float(np.mean(loss[-tenth:]))
    idx = spikes(curve["grad_norm"], factor, window)
    return {"logged_steps": int(len(loss)), "last_step": int(curve["steps"][-1]),
            "loss_first_tenth": round(first, 4), "loss_last_tenth": round(last, 4),
            "falling": last < first, "finite": bool(np.all(np.isfinite(loss))),
            "max_grad_norm": float(np.nanmax(curve["grad_norm"])),
            "spike_steps": [int(curve["steps"][i]) for i in idx],
            "final_eval_bpb": (float(curve["eval_bpb"][-1]) if len(curve["eval_bpb"])
                               else None)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--spike_factor", type=float, default=4.0)
    ap.add_argument("--window", type=int, default=20)
    args = ap.parse_args(argv)
    if args.spike_factor <= 1 or args.window < 1:
        raise SystemExit("--spike_factor must be > 1 and --window >= 1")
    curve = load_curve(args.workdir)
    s = summary(curve, args.spike_factor, args.window)
    verdict = ("stable" if s["falling"] and s["finite"] and not s["spike_steps"]
               else "NOT stable")
    md = [f"# Training curve of `{args.workdir}`", "",
          f"{s['logged_steps']} logged steps up to step {s['last_step']}: train loss "
          f"{s['loss_first_tenth']} (first tenth) -> {s['loss_last_tenth']} (last tenth); "
          f"max grad norm {s['max_grad_norm']:.3g}; spikes (> {args.spike_factor:g}x the "
          f"median of the {args.window} logged steps before): "
          f"{s['spike_steps'] or 'none'}; final eval bits/byte "
          f"{'-' if s['final_eval_bpb'] is None else format(s['final_eval_bpb'], '.4f')}. "
          f"**{verdict}**."]
    if len(curve["eval_steps"]):
        md += ["", "| step | eval bits/byte |", "|---|---|"] + [
            f"| {int(a)} | {b:.4f} |" for a, b in zip(curve["eval_steps"], curve["eval_bpb"],
                                                       strict=True)]
    cfg_path = os.path.join(args.workdir, "config.json")
    config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else None

    def plot(plt):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        axes[0].plot(curve["steps"], curve["loss"], label="train loss (nats)")
        if len(curve["eval_steps"]):
            axes[0].plot(curve["eval_steps"], curve["eval_bpb"], "o-", label="eval bits/byte")
        axes[0].set_xlabel("step")
        axes[0].legend()
        axes[1].semilogy(curve["steps"], curve["grad_norm"])
        for st in s["spike_steps"]:
            axes[1].axvline(st, color="r", lw=0.5)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("grad norm")
        return fig

    write_report(args.out, markdown="\n".join(md),
                 header=["step", "train_loss", "grad_norm"],
                 rows=[[int(a), f"{b:.5f}", f"{c:.5g}"] for a, b, c in
                       zip(curve["steps"], curve["loss"], curve["grad_norm"], strict=True)],
                 configs={"summary": s, "spike_factor": args.spike_factor,
                          "window": args.window, "run_config": config},
                 plot=plot)
    print("\n".join(md))
    return s


if __name__ == "__main__":
    main()
