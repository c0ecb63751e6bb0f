"""Multi-query associative recall (MQAR): accuracy against state size and width for Mamba-2,
Mamba-3 SISO and Mamba-3 MIMO (R = 4).

Each cell (model, d_model, d_state) trains over a learning-rate sweep (vmapped, best-of), and is
evaluated on fresh sequences: accuracy over the query positions. Writes results.md, results.csv,
plot.png (accuracy vs state size, one line per model and width) and configs.json under
experiments/results/mqar/ (or --out).

    python experiments/mqar.py --preset fast      # GPU
    python experiments/mqar.py --preset ci        # tiny CPU smoke run
    python experiments/mqar.py --preset fast --models mamba3_siso,gdn   # with Gated DeltaNet

Gated DeltaNet (`gdn`, keys of d_state channels per head) runs on request (--models).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mamba3_jax.config import ModelConfig
from mamba3_jax.tasks import MQARTask
from mamba3_jax.training.lr_sweep import LRSweep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_report  # noqa: E402

MODELS = {
    "mamba2": {"mixer": "mamba2", "d_conv": 4, "rotation": "none"},
    "mamba3_siso": {},
    "mamba3_mimo4": {"mimo_rank": 4},
    "gdn": {"mixer": "gated_deltanet", "d_conv": 4},  # not in the default --models
}
DEFAULT_MODELS = ("mamba2", "mamba3_siso", "mamba3_mimo4")


@dataclasses.dataclass(frozen=True)
class Preset:
    seq_len: int = 256
    num_kv_pairs: int = 32
    vocab_size: int = 8192
    d_models: tuple = (64, 128)
    d_states: tuple = (16, 32, 64, 128)
    n_layer: int = 2
    headdim: int = 32
    steps: int = 4000
    batch_size: int = 128
    lrs: tuple = (3e-4, 1e-3, 3e-3, 1e-2)
    warmup: int = 200
    eval_batches: int = 4


PRESETS = {
    "fast": Preset(),
    "ci": Preset(seq_len=32, num_kv_pairs=4, vocab_size=64, d_models=(32,), d_states=(8,),
                 n_layer=1, headdim=16, steps=30, batch_size=16, lrs=(3e-3,), warmup=5,
                 eval_batches=1),
}


def train_cell(model: str, d_model: int, d_state: int, p: Preset, seed: int = 0) -> dict:
    task = MQARTask(seq_len=p.seq_len, num_kv_pairs=p.num_kv_pairs, vocab_size=p.vocab_size)
    cfg = ModelConfig(vocab_size=p.vocab_size, d_model=d_model, n_layer=p.n_layer,
                      d_state=d_state, headdim=p.headdim, scan_backend="auto",
                      **MODELS[model])
    sweep = LRSweep(cfg, p.lrs, p.steps, warmup=p.warmup, seed=seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(p.steps):
        losses = sweep.step(task.make_batch(rng, p.batch_size), step)
    jax.block_until_ready(losses)
    train_s = time.time() - t0

    def predict(m, inputs, positions):
        return jnp.argmax(m(inputs, positions=positions), axis=-1)

    evaluate = sweep.apply(predict)
    erng = np.random.default_rng(seed + 999)
    correct, count = np.zeros(len(p.lrs)), 0.0
    for _ in range(p.eval_batches):
        b = task.make_batch(erng, p.batch_size)
        pred = np.asarray(evaluate(b["inputs"], b["positions"]))
        mask = b["loss_mask"][None] > 0
        correct += ((pred == b["targets"][None]) & mask).sum(axis=(1, 2))
        count += mask.sum()
    acc = correct / count
    best = int(np.argmax(acc))
    return {"model": model, "d_model": d_model, "d_state": d_state, "acc": float(acc[best]),
            "best_lr": p.lrs[best], "acc_per_lr": acc.tolist(),
            "final_loss_per_lr": np.asarray(losses).tolist(), "params": cfg.num_params(),
            "train_seconds": round(train_s, 1), "config": cfg.to_dict()}


def write_results(rows, out, preset_name, p: Preset):
    d_states = sorted({r["d_state"] for r in rows})
    lines = [f"# MQAR, preset `{preset_name}`", "",
             f"seq_len {p.seq_len}, {p.num_kv_pairs} key-value pairs, vocab {p.vocab_size}, "
             f"{p.n_layer} layers, {p.steps} steps at batch {p.batch_size}, best of "
             f"{len(p.lrs)} learning rates. Accuracy (%) over query positions. "
             f"Device: {jax.devices()[0].device_kind}.", "",
             "| model | d_model | " + " | ".join(f"N={n}" for n in d_states) + " |",
             "|---|---|" + "---|" * len(d_states)]
    keyed = {(r["model"], r["d_model"], r["d_state"]): r for r in rows}
    lines_of = sorted({(r["model"], r["d_model"]) for r in rows})
    for model, d in lines_of:
        cells = [f"{100 * keyed[(model, d, n)]['acc']:.1f}" if (model, d, n) in keyed else "-"
                 for n in d_states]
        lines.append(f"| {model} | {d} | " + " | ".join(cells) + " |")

    def plot(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, d in lines_of:
            pts = sorted((r["d_state"], r["acc"]) for r in rows
                         if r["model"] == model and r["d_model"] == d)
            ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o",
                    label=f"{model} d={d}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_state")
        ax.set_ylabel("MQAR accuracy %")
        ax.legend(fontsize=8)
        return fig

    write_report(
        out, markdown="\n".join(lines),
        header=["model", "d_model", "d_state", "acc", "best_lr", "params", "train_seconds"],
        rows=[[r["model"], r["d_model"], r["d_state"], f"{r['acc']:.4f}", r["best_lr"],
               r["params"], r["train_seconds"]] for r in rows],
        configs={"preset": preset_name, "settings": dataclasses.asdict(p), "runs": rows},
        plot=plot)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="fast", choices=sorted(PRESETS))
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated, from {list(MODELS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="experiments/results/mqar")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    rows = []
    for model, d, n in itertools.product(args.models.split(","), p.d_models, p.d_states):
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}; choose from {list(MODELS)}")
        r = train_cell(model, d, n, p, args.seed)
        print(f"{model:14s} d_model {d:4d} d_state {n:4d} acc {100 * r['acc']:5.1f}% "
              f"({r['train_seconds']:.0f}s)", flush=True)
        rows.append(r)
        write_results(rows, args.out, args.preset, p)
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
