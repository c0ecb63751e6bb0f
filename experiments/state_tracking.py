"""Paper Table 5b: state tracking (parity, modular arithmetic with and without brackets).

One command trains every (task, variant) cell over a learning-rate sweep — all learning rates of
a cell train at once, vmapped over stacked parameter copies — with the length curriculum, then
evaluates at length 256 and keeps the best learning rate (the paper's protocol). It writes
results.md (ours beside the paper's numbers), results.csv, plot.png and configs.json under
experiments/results/state_tracking/ (or --out).

    python experiments/state_tracking.py --preset fast          # GPU, the whole table
    python experiments/state_tracking.py --preset ci            # seconds-scale CPU check
    python experiments/state_tracking.py --preset cpu --tasks parity \
        --out experiments/results/state_tracking_cpu
    python experiments/state_tracking.py --preset fast --tasks parity --variants mamba3,mamba2
    python experiments/state_tracking.py --preset cpu --tasks parity --seeds 0,1,2,3,4

Every finished cell is kept under <out>/cells/ (one JSON each): a rerun of the same command skips
them (a study stopped by a 10-minute limit resumes cell by cell), and `--shard i/n` splits the
cells over processes sharing --out (one per GPU); the tables cover every finished cell.

Rows (--variants): the paper's mamba3, mamba3_std_rope, mamba3_no_rope, mamba2 and gdn (Gated
DeltaNet, eigenvalues in [-1, 1]) by default; also gdn_01 (eigenvalues in [0, 1]) and
transformer (Transformer++ with RoPE; not in the paper's table, which has no number for it).

Mamba-3 here runs with untied embeddings and a per-step angle pi tanh(angles) not scaled by dt
(Preset.tie_embeddings / rotation_dt; --paper_rotation restores the LM rule, which learns parity
on few seeds): docs/tasks.md "Why parity failed".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mamba3_jax.config import ModelConfig
from mamba3_jax.tasks import curriculum, get_task, make_batch, scaled_accuracy
from mamba3_jax.training.lr_sweep import LRSweep
from mamba3_jax.training.sweep import parse_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_report  # noqa: E402

# Paper Table 5b (scaled accuracy %), SISO.
PAPER = {
    "mamba3": {"parity": 100.00, "mod_arith": 98.51, "mod_arith_brackets": 87.75},
    "mamba3_std_rope": {"parity": 1.56, "mod_arith": 20.70, "mod_arith_brackets": 2.62},
    "mamba3_no_rope": {"parity": 2.27, "mod_arith": 1.49, "mod_arith_brackets": 0.72},
    "mamba2": {"parity": 0.90, "mod_arith": 47.81, "mod_arith_brackets": 0.88},
    "gdn": {"parity": 100.00, "mod_arith": 99.25, "mod_arith_brackets": 93.50},
}
VARIANTS = {  # ModelConfig overrides per row of the table
    "mamba3": {},
    "mamba3_std_rope": {"rotation": "fixed"},
    "mamba3_no_rope": {"rotation": "none"},
    "mamba2": {"mixer": "mamba2", "d_conv": 4, "rotation": "none"},
    # Gated DeltaNet with eigenvalues in [-1, 1] (the paper's row); gdn_01: beta in (0, 1)
    "gdn": {"mixer": "gated_deltanet", "d_conv": 4, "negative_eigenvalues": True},
    "gdn_01": {"mixer": "gated_deltanet", "d_conv": 4},
    # Transformer++ (RoPE): not in the paper's table; evaluated beyond its training lengths
    "transformer": {"mixer": "attention"},
}
# rows run by default: the paper's table (the extra rows are asked for with --variants)
DEFAULT_VARIANTS = ("mamba3", "mamba3_std_rope", "mamba3_no_rope", "mamba2", "gdn")
LAYERS = {"parity": 1, "mod_arith": 3, "mod_arith_brackets": 3}  # paper: 1 layer for parity
# tasks outside the paper's table (not run by default): mod_sum needs a second layer for the
# sign, as its digits rotate by + or - according to the operator before them
DIAGNOSTIC_LAYERS = {"mod_sum": 2}


@dataclasses.dataclass(frozen=True)
class Preset:
    stage_lengths: tuple = (40, 80, 120, 160)
    steps_per_stage: int = 10_000
    batch_size: int = 256
    lrs: tuple = tuple(float(x) for x in np.logspace(-4, -2, 8))
    eval_length: int = 256
    eval_batches: int = 4
    d_model: int = 64
    d_state: int = 64
    headdim: int = 32
    warmup: int = 500
    weight_decay: float = 0.1
    min_len: int = 3
    # Model options of the task (docs/tasks.md "Why parity failed"): untied input/output
    # embeddings and a rotation of pi tanh(angles) per step, not scaled by dt. The paper's LM
    # rule (tied, angle scaled by dt) learns parity on few seeds; --paper_rotation restores it.
    tie_embeddings: bool = False
    rotation_dt: bool = False


PRESETS = {
    "paper": Preset(),  # 4 x 10^4 steps at batch 256, as in the paper
    "fast": Preset(steps_per_stage=2_500),  # the whole table in hours on one GPU
    "ci": Preset(stage_lengths=(10,), steps_per_stage=400, batch_size=64,
                 lrs=(3e-3, 1e-2), eval_length=8, eval_batches=4, d_model=32, d_state=16,
                 headdim=16, warmup=20, min_len=2),
    # CPU scale (2-core VM, ~2 min per parity cell): two curriculum stages up to length 24,
    # evaluated at 32 (length generalisation as in the paper's 160 -> 256). Parity learns at
    # this scale; modular arithmetic needs the GPU presets (experiments/README.md).
    "cpu": Preset(stage_lengths=(12, 24), steps_per_stage=600, batch_size=64,
                  lrs=(1e-3, 3e-3, 1e-2), eval_length=32, eval_batches=4, d_model=32,
                  d_state=16, headdim=16, warmup=50, min_len=2),
}


def model_config(task_name: str, variant: str, p: Preset, vocab_size: int) -> ModelConfig:
    # scan_backend auto: the Pallas kernels on a GPU (fast parity cell, H200: 12.0 ms a step,
    # against 21.3 ms with the chunked XLA form), the chunked form on a CPU
    n_layer = {**LAYERS, **DIAGNOSTIC_LAYERS}[task_name]
    return ModelConfig(vocab_size=vocab_size, d_model=p.d_model, n_layer=n_layer,
                       d_state=p.d_state, headdim=p.headdim, chunk_size=16,
                       scan_backend="auto", tie_embeddings=p.tie_embeddings,
                       rotation_dt=p.rotation_dt, **VARIANTS[variant])


SAVE_EVERY = 500  # steps between snapshots of an unfinished cell (a few ms each)


def save_partial(path: str, sweep: LRSweep, step: int, rng: np.random.Generator,
                 train_s: float, settings: dict) -> None:
    """Snapshot of an unfinished cell: every copy's weights and optimizer state, the next step,
    the batch generator's state and the training seconds so far (written atomically)."""
    meta = {"step": step, "rng": rng.bit_generator.state, "train_s": train_s,
            "settings": settings}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, meta=np.array(json.dumps(meta)),
             **{f"a{i}": a for i, a in enumerate(sweep.state())})
    os.replace(tmp, path)


def load_partial(path: str, sweep: LRSweep, rng: np.random.Generator, settings: dict):
    """Restore save_partial's snapshot into sweep and rng; returns (next step, seconds)."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if meta["settings"] != settings:
            raise SystemExit(f"{path} was saved with other settings; remove it or use "
                             "another --out")
        sweep.load_state([z[f"a{i}"] for i in range(len(z.files) - 1)])
    rng.bit_generator.state = meta["rng"]
    return meta["step"], meta["train_s"]


def train_cell(task_name: str, variant: str, p: Preset, seed: int = 0, log=print,
               partial: str | None = None, stop=lambda step: False,
               lrs: tuple | None = None, on_trained=None) -> dict | None:
    """Train one (task, variant) cell for every learning rate at once; evaluate each.

    With `partial` (a .npz path) the cell resumes from that snapshot when it exists and saves
    one every SAVE_EVERY steps; `stop(step)` true ends the run early (after saving): then the
    result is None and the same call later goes on with the same batches and updates.
    `lrs` trains those learning rates instead of the preset's (the reduced protocol's seeds).
    `on_trained(sweep)` sees the trained LRSweep before the evaluation (a probe of the models)."""
    if lrs is not None:
        p = dataclasses.replace(p, lrs=tuple(lrs))
    task = get_task(task_name)
    cfg = model_config(task_name, variant, p, task.vocab_size)
    total = p.steps_per_stage * len(p.stage_lengths)
    sweep = LRSweep(cfg, p.lrs, total, warmup=p.warmup, weight_decay=p.weight_decay, seed=seed)
    answer_ids = jnp.asarray(task.answer_token_ids)

    def predict(model, inputs, positions):
        logits = model(inputs, positions=positions)[:, -1]  # answers sit in the last column
        return jnp.argmax(logits[:, answer_ids], axis=-1)

    lengths_at = curriculum(p.stage_lengths, p.steps_per_stage, p.min_len)
    rng = np.random.default_rng(seed)
    pad_to = max(p.stage_lengths) + 1
    settings = {"task": task_name, "variant": variant, "seed": seed, **_settings(p)}
    start, before_s = 0, 0.0
    if partial and os.path.exists(partial):
        start, before_s = load_partial(partial, sweep, rng, settings)
        log(f"  {task_name}/{variant} seed {seed}: resumed at step {start}")
    t0 = time.time()
    for step in range(start, total):
        halt = stop(step)
        if partial and step > start and (step % SAVE_EVERY == 0 or halt):
            save_partial(partial, sweep, step, rng, before_s + time.time() - t0, settings)
        if halt:
            log(f"  {task_name}/{variant} seed {seed}: stopped at step {step}, saved")
            return None
        lo, hi = lengths_at(step)
        losses = sweep.step(make_batch(task, rng, p.batch_size, lo, hi, pad_to=pad_to), step)
        if step % max(total // 10, 1) == 0 or step == total - 1:
            log(f"  {task_name}/{variant} step {step} lengths {lo}..{hi} "
                f"loss per lr {np.round(np.asarray(losses), 3).tolist()}")
    train_s = before_s + time.time() - t0
    if on_trained is not None:
        on_trained(sweep)
    evaluate = sweep.apply(predict)

    def accuracy(length: int):  # accuracy per learning rate on strings of that length
        correct, count = np.zeros(len(p.lrs)), 0
        erng = np.random.default_rng(seed + 12345)
        for _ in range(p.eval_batches):
            b = make_batch(task, erng, p.batch_size, length, length)
            pred = np.asarray(evaluate(b["inputs"], b["positions"]))
            correct += (pred == b["answers"][None]).sum(axis=1)
            count += len(b["answers"])
        return correct / count

    acc = accuracy(p.eval_length)
    scaled = 100.0 * np.asarray(scaled_accuracy(acc, task.num_classes))
    best = int(np.argmax(scaled))
    # the same at the longest training length: tells a rate that never learned the task from
    # one that learned it on the training lengths and does not carry it to the evaluation's
    scaled_train = 100.0 * np.asarray(scaled_accuracy(accuracy(max(p.stage_lengths)),
                                                      task.num_classes))
    return {"task": task_name, "variant": variant, "seed": seed, "best_lr": p.lrs[best],
            "scaled_acc": float(scaled[best]), "acc": float(acc[best]),
            "scaled_acc_per_lr": [float(s) for s in scaled],
            "train_length": max(p.stage_lengths),
            "scaled_acc_train_length_per_lr": [float(s) for s in scaled_train],
            "final_loss_per_lr": [float(x) for x in np.asarray(losses)],
            "train_seconds": round(train_s, 1), "steps": total,
            "params": int(cfg.num_params()), "config": cfg.to_dict(),
            "device": jax.devices()[0].device_kind}


def write_results(rows: list[dict], out: str, preset_name: str, p: Preset) -> None:
    """Table of mean [min, max] over seeds per cell; every seed's number in the CSV."""
    tasks = [t for t in LAYERS if any(r["task"] == t for r in rows)]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    cell: dict = {}
    for r in rows:
        cell.setdefault((r["task"], r["variant"]), []).append(r)
    seeds = sorted({r.get("seed", 0) for r in rows})
    # the devices that trained the cells (cells from before this field: "not recorded")
    devices = sorted({r.get("device", "not recorded") for r in rows})
    reused = sum("lr_from_seed" in r for r in rows)
    lr_rule = (f"best of {len(p.lrs)} learning rates" if len(p.lrs) > 1
               else f"one learning rate ({p.lrs[0]:.3g}, `--lrs`)") + (
        "" if not reused else f" (for {reused} of the {len(rows)} runs, those with an "
        "`lr_from_seed` in results.csv: the best rate of that seed of the same cell, the only "
        "one trained: the reduced protocol of `--lr_from_seed`)")
    lines = [f"# State tracking (paper Table 5b), preset `{preset_name}`", "",
             f"Scaled accuracy % at length {p.eval_length}, {lr_rule}; seeds {seeds}. "
             f"Model options: tie_embeddings={p.tie_embeddings}, "
             f"rotation_dt={p.rotation_dt}. Trained on: {', '.join(devices)}.", "",
             "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for v in variants:
        vals = []
        for t in tasks:
            rs = cell.get((t, v))
            if rs is None:
                vals.append("-")
                continue
            acc = np.array([r["scaled_acc"] for r in rs])
            secs = np.mean([r["train_seconds"] for r in rs])
            span = (f" [{acc.min():.2f}, {acc.max():.2f}] n={len(rs)}" if len(rs) > 1
                    else f" (seed {rs[0].get('seed', 0)})")
            paper = PAPER.get(v, {}).get(t)
            ref = "-" if paper is None else f"{paper:.2f}"
            at_train = [float(x) for x in map(_at_train_length, rs) if x]
            seen = ("" if len(at_train) < len(rs)
                    else f"; {np.mean(at_train):.2f} at length {rs[0]['train_length']}")
            vals.append(f"{acc.mean():.2f}{span} / {ref} ({secs:.0f}s{seen})")
        lines.append(f"| {v} | " + " | ".join(vals) + " |")
    lines += ["", "Cells: ours, mean [min, max] n=<seeds> over the seeds when more than one "
              "(else the seed) / paper (mean wall seconds of training per seed, all learning "
              "rates together; and, for cells that recorded it, the mean scaled accuracy of the "
              "chosen rate at the longest training length). Every "
              "seed's number: results.csv."]

    def plot(plt):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            accs = [[r["scaled_acc"] for r in cell.get((t, v), [])] or [0.0] for t in tasks]
            ys = np.array([np.mean(a) for a in accs])
            err = np.array([[y - min(a) for y, a in zip(ys, accs, strict=True)],
                            [max(a) - y for y, a in zip(ys, accs, strict=True)]])
            ax.bar(np.arange(len(tasks)) + i * width, ys, width, yerr=err, capsize=2, label=v)
        ax.set_xticks(np.arange(len(tasks)) + width * (len(variants) - 1) / 2, tasks)
        ax.set_ylabel("scaled accuracy %")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
        return fig

    write_report(
        out, markdown="\n".join(lines),
        header=["task", "variant", "seed", "scaled_acc", "acc", "best_lr", "lr_from_seed",
                "scaled_acc_train_length", "paper", "train_seconds", "steps", "params",
                "device"],
        rows=[[r["task"], r["variant"], r.get("seed", 0), f"{r['scaled_acc']:.2f}",
               f"{r['acc']:.4f}", r["best_lr"], r.get("lr_from_seed", ""),
               _at_train_length(r),
               PAPER.get(r["variant"], {}).get(r["task"], ""),
               r["train_seconds"], r["steps"], r["params"], r.get("device", "not recorded")]
              for r in rows],
        configs={"preset": preset_name, "settings": dataclasses.asdict(p), "seeds": seeds,
                 "runs": rows},
        plot=plot)


def _at_train_length(row: dict) -> str:
    """Scaled accuracy at the longest training length of the rate chosen at the evaluation
    length ('' for cells stored before that field)."""
    per_lr = row.get("scaled_acc_train_length_per_lr")
    if not per_lr:
        return ""
    best = int(np.argmax(row["scaled_acc_per_lr"]))
    return f"{per_lr[best]:.2f}"


CELLS = "cells"  # <out>/cells/<task>__<variant>__seed<seed>.json: one finished cell each


def _settings(p: Preset) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(p)))  # as stored (tuples become lists)


def cell_file(out: str, task: str, variant: str, seed: int) -> str:
    return os.path.join(out, CELLS, f"{task}__{variant}__seed{seed}.json")


def partial_file(out: str, task: str, variant: str, seed: int) -> str:
    """Where an unfinished cell keeps its snapshot (train_cell's `partial`)."""
    return cell_file(out, task, variant, seed)[:-len(".json")] + ".partial.npz"


def stored_cells(out: str, preset_name: str, p: Preset) -> list[dict]:
    """The finished cells under out (any process's), after checking that they were trained
    with this preset and these settings (a clear error otherwise: another --out is needed)."""
    folder = os.path.join(out, CELLS)
    rows = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name)) as f:
            r = json.load(f)
        if r.get("preset") != preset_name or r.get("settings") != _settings(p):
            raise SystemExit(f"{out} holds cells of another preset or settings ({name}: preset "
                             f"{r.get('preset')!r}); give this run another --out")
        rows.append(r)
    return rows


def store_cell(out: str, row: dict, preset_name: str, p: Preset) -> None:
    """Write one finished cell atomically (a killed run never leaves half a file)."""
    path = cell_file(out, row["task"], row["variant"], row.get("seed", 0))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({**row, "preset": preset_name, "settings": _settings(p)}, f)
    os.replace(tmp, path)


def parse_lrs(text: str) -> tuple:
    """'3e-3,1e-2' -> (0.003, 0.01); anything but positive finite numbers: one clear error."""
    try:
        lrs = tuple(float(x) for x in text.split(","))
    except ValueError:
        lrs = ()
    if not lrs or not all(np.isfinite(x) and x > 0 for x in lrs):
        raise SystemExit(f"--lrs wants positive numbers separated by commas, got {text!r}")
    return lrs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="fast", choices=sorted(PRESETS))
    ap.add_argument("--tasks", default=",".join(LAYERS))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated rows from {list(VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds (overrides --seed), e.g. 0,1,2,3,4")
    ap.add_argument("--paper_rotation", action="store_true",
                    help="tied embeddings and angle pi tanh(angles) dt (the LM rule); "
                         "learns parity on few seeds (docs/tasks.md)")
    ap.add_argument("--out", default="experiments/results/state_tracking")
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="take every N-th cell from the I-th (one process per GPU, the same "
                         "--out: e.g. CUDA_VISIBLE_DEVICES=1 ... --shard 1/2)")
    ap.add_argument("--time_budget", type=float, default=None, metavar="SECONDS",
                    help="stop cleanly after this many seconds, the unfinished cell saved "
                         "(<out>/cells/*.partial.npz); the same command goes on from there")
    ap.add_argument("--lr_from_seed", type=int, default=None, metavar="S",
                    help="reduced protocol: seed S of each (task, variant) sweeps the preset's "
                         "learning rates, the other seeds train only at S's best one")
    ap.add_argument("--lrs", default=None, metavar="LR[,LR...]",
                    help="train these learning rates instead of the preset's (e.g. one rate "
                         "found at a shorter preset); part of the cells' settings: use a new --out")
    ap.add_argument("--weight_decay", type=float, default=None, metavar="WD",
                    help="AdamW weight decay instead of the preset's 0.1 (0: none, e.g. to let "
                         "the angle projection settle on exact angles); part of the cells' "
                         "settings: use a new --out")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    if args.lrs is not None:
        p = dataclasses.replace(p, lrs=parse_lrs(args.lrs))
    if args.weight_decay is not None:
        if not (np.isfinite(args.weight_decay) and args.weight_decay >= 0):
            raise SystemExit(f"--weight_decay wants a number >= 0, got {args.weight_decay}")
        p = dataclasses.replace(p, weight_decay=args.weight_decay)
    if args.paper_rotation:
        p = dataclasses.replace(p, tie_embeddings=True, rotation_dt=True)
    seeds = ([int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed])
    shard, n_shards = parse_shard(args.shard)
    for t in args.tasks.split(","):
        if t not in LAYERS:
            raise SystemExit(f"unknown task {t!r}; choose from {list(LAYERS)}")
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    groups = [(t, v) for t in args.tasks.split(",") for v in args.variants.split(",")]
    if args.lr_from_seed is None:
        plan = [(t, v, seed) for t, v in groups for seed in seeds][shard::n_shards]
    else:  # a group's seeds in one process, the sweeping seed first
        if args.lr_from_seed not in seeds:
            raise SystemExit(f"--lr_from_seed {args.lr_from_seed} is not in the seeds {seeds}")
        order = [args.lr_from_seed] + [x for x in seeds if x != args.lr_from_seed]
        plan = [(t, v, seed) for t, v in groups[shard::n_shards] for seed in order]
    stored_cells(args.out, args.preset, p)  # another preset's cells there: stop before training
    deadline = time.time() + args.time_budget if args.time_budget else float("inf")
    for t, v, seed in plan:
        if os.path.exists(cell_file(args.out, t, v, seed)):  # finished by an earlier run
            print(f"{t:20s} {v:16s} seed {seed} done before, kept", flush=True)
            continue
        snapshot = partial_file(args.out, t, v, seed)
        lrs = None
        if args.lr_from_seed is not None and seed != args.lr_from_seed:
            with open(cell_file(args.out, t, v, args.lr_from_seed)) as f:  # trained just before
                lrs = (json.load(f)["best_lr"],)
        r = train_cell(t, v, p, seed, partial=snapshot, stop=lambda step: time.time() > deadline,
                       lrs=lrs)
        if r is None:  # out of --time_budget: the snapshot lets the same command go on
            break
        if lrs:
            r["lr_from_seed"] = args.lr_from_seed
        print(f"{t:20s} {v:16s} seed {seed} scaled acc {r['scaled_acc']:6.2f}  best lr "
              f"{r['best_lr']:.2e}  ({r['train_seconds']:.0f}s)", flush=True)
        store_cell(args.out, r, args.preset, p)
        if os.path.exists(snapshot):
            os.remove(snapshot)
        # the report covers every finished cell under --out, other shards' included
        write_results(stored_cells(args.out, args.preset, p), args.out, args.preset, p)
    rows = stored_cells(args.out, args.preset, p)
    if rows:
        write_results(rows, args.out, args.preset, p)
        print(open(os.path.join(args.out, "results.md")).read())
    return rows


if __name__ == "__main__":
    main()
