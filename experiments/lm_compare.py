"""Small-scale language-model comparisons on the bundled books corpus (paper Tables 5a, 8, 10
and the state-size claim), reported as test-split bits per byte, mean and spread over seeds.

Studies:
  state_size  d_state in {16, 32, 64, 128} x {Mamba-2, Mamba-3 SISO, Mamba-3 MIMO R=4 (narrower
              MLP)}; Pareto plot of bits/byte against state size. Paper claim: Mamba-3 at
              state 64 matches Mamba-2 at 128.
  ablations   no bias + Euler, no bias, full, full + short conv (Table 5a); lambda learned /
              1/2 / Euler (Table 8); B/C bias init 1 / 0 / frozen 1 (Table 10).
  baselines   Mamba-3 SISO, Mamba-3 MIMO R=4, Mamba-2, Transformer++ and Gated DeltaNet at the
              config's size (on configs/small_gpu.py the Transformer's MLP is widened to 1408,
              parameter count within 1.1% of the SISO model's; Gated DeltaNet has keys of 64
              and values of 128 channels per head, the SISO model's state size per layer, and
              an MLP of 736, within 0.1%).

Every run is a normal training run (`python -m mamba3_jax.train`, config `configs/small_gpu.py`
by default) in its own workdir under --workdir, evaluated on the books *test* split
(`data.eval_source.split=test`; nothing is selected on it). Interrupted studies resume.

    python experiments/lm_compare.py --study state_size --workdir runs/lm_state_size
    python experiments/lm_compare.py --study ablations --workdir runs/lm_ablations --dry_run
    python experiments/lm_compare.py --study ablations --workdir runs/x --collect_only

Outputs: experiments/results/lm_<study>/{results.md, results.csv, plot.png, configs.json}.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import write_report  # noqa: E402

from mamba3_jax.training import sweep  # noqa: E402

MAMBA2 = {"model.mixer": "mamba2", "model.d_conv": "4", "model.rotation": "none"}
MIMO = {"model.mimo_rank": "4", "model.d_mlp": "896"}  # narrower MLP, as configs/small_gpu.py
# Transformer++: attention with RoPE; MLP 1408 matches small_gpu's SISO parameter count (26.1M)
TRANSFORMER = {"model.mixer": "attention", "model.d_mlp": "1408", "model.max_seq_len": "1024"}
# Gated DeltaNet: 8 heads of 128 values x 64 keys (= SISO's 16 x 64 x 64 state); MLP 736 matches
GDN = {"model.mixer": "gated_deltanet", "model.d_conv": "4", "model.headdim": "128",
       "model.d_mlp": "736", "model.mlp_multiple_of": "32"}
STUDIES = {
    "state_size": {
        f"{name}_N{n}": {**over, "model.d_state": str(n)}
        for name, over in (("mamba2", MAMBA2), ("siso", {}), ("mimo", MIMO))
        for n in (16, 32, 64, 128)
    },
    "baselines": {"mamba3_siso": {}, "mamba3_mimo": MIMO, "mamba2": MAMBA2,
                  "transformer": TRANSFORMER, "gdn": GDN},
    "ablations": {  # paper value (440M test perplexity) in the comment
        "full": {},  # 15.72
        "nobias_euler": {"model.bc_bias": "False", "model.discretization": "euler"},  # 16.68
        "nobias": {"model.bc_bias": "False"},  # 16.49
        "full_conv": {"model.d_conv": "4"},  # 15.85
        "lambda_half": {"model.discretization": "trapezoid_half"},  # 15.76
        "lambda_euler": {"model.discretization": "euler"},  # 15.81
        "bias_init0": {"model.bc_bias_init": "0.0"},  # 16.57
        "bias_frozen1": {"model.bc_bias_trainable": "False"},  # 15.80
    },
}
PAPER_PPL = {"full": 15.72, "nobias_euler": 16.68, "nobias": 16.49, "full_conv": 15.85,
             "lambda_half": 15.76, "lambda_euler": 15.81, "bias_init0": 16.57,
             "bias_frozen1": 15.80}


def plan(study: str, config: str, workdir: str, seeds, fixed: dict,
         variants: Optional[list[str]] = None) -> list[dict]:
    """The study's runs (every variant, or those named, in the study's order) x seeds."""
    unknown = sorted(set(variants or ()) - set(STUDIES[study]))
    if unknown:
        raise SystemExit(f"unknown {study} variants {unknown}; valid: {sorted(STUDIES[study])}")
    runs = []
    for variant, over in STUDIES[study].items():
        if variants and variant not in variants:
            continue
        for seed in seeds:
            name = f"{variant}_seed{seed}"
            overrides = {"data.eval_source.split": "test", "train.seed": str(seed), **fixed,
                         **over}
            wd = os.path.join(workdir, name)
            runs.append({"name": name, "workdir": wd, "variant": variant, "seed": seed,
                         "point": {"variant": variant, "seed": seed}, "overrides": overrides,
                         "command": sweep.train_command(config, wd, overrides)})
    return runs


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and spread (sample std; min..max) of final test bits/byte per variant."""
    out = {}
    for r in rows:
        # a stopped or failed run's last evaluation is not a result (step 0's, for one that died)
        if r.get("eval_bpb") is None or not r.get("complete"):
            continue
        out.setdefault(r["variant"], []).append(r)
    table = []
    for variant, rs in out.items():
        vals = [r["eval_bpb"] for r in rs]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 \
            else float("nan")
        table.append({"variant": variant, "seeds": len(vals), "test_bpb_mean": mean,
                      "test_bpb_std": std, "min": min(vals), "max": max(vals),
                      "params_M": rs[0].get("params_M")})
    return table


def write(study: str, table: list[dict], rows: list[dict], out: str, runs: list[dict]) -> None:
    abl = study == "ablations"
    lines = [f"# LM comparison: {study}", "",
             "Books corpus, test-split bits per byte at the end of training; mean ± sample std "
             "over seeds (min..max).", "",
             "| variant | params (M) | seeds | test bits/byte | min..max |"
             + (" paper 440M ppl |" if abl else ""),
             "|---|---|---|---|---|" + ("---|" if abl else "")]
    for t in table:
        line = (f"| {t['variant']} | {t['params_M']} | {t['seeds']} | "
                f"{t['test_bpb_mean']:.4f} ± {t['test_bpb_std']:.4f} | "
                f"{t['min']:.4f}..{t['max']:.4f} |")
        lines.append(line + (f" {PAPER_PPL.get(t['variant'], '')} |" if abl else ""))

    def plot(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in ("mamba2", "siso", "mimo"):
            pts = sorted((int(t["variant"].rsplit("_N", 1)[1]), t["test_bpb_mean"],
                          t["test_bpb_std"]) for t in table
                         if t["variant"].startswith(model + "_N"))
            if pts:
                ax.errorbar([q[0] for q in pts], [q[1] for q in pts],
                            yerr=[0 if math.isnan(q[2]) else q[2] for q in pts],
                            marker="o", capsize=3, label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_state")
        ax.set_ylabel("test bits per byte")
        ax.legend()
        return fig

    header = list(table[0]) if table else ["variant"]
    write_report(out, markdown="\n".join(lines), header=header,
                 rows=[[t[k] for k in header] for t in table],
                 configs={"study": study, "runs": [{k: r[k] for k in ("name", "overrides")}
                                                   for r in runs], "per_run": rows},
                 plot=plot if study == "state_size" and table else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, choices=sorted(STUDIES))
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default="configs/small_gpu.py")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=None, metavar="A,B",
                    help="only these variants of the study (a batch that fits a lent machine; "
                         "the tables cover the runs of the same selection)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every run, e.g. train.steps=1500")
    ap.add_argument("--dry_run", action="store_true")
    ap.add_argument("--collect_only", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="train every N-th run from the I-th (one process per GPU, the same "
                         "--workdir); the tables cover every finished run")
    ap.add_argument("--time_budget", type=float, default=None, metavar="SECONDS",
                    help="start a run only while more time is left than the longest run "
                         "took (a lent machine's limit); the same command goes on later")
    args = ap.parse_args(argv)
    fixed = dict(sweep.parse_fixed(s) for s in args.set)
    runs = plan(args.study, args.config, args.workdir, [int(s) for s in args.seeds.split(",")],
                fixed, args.variants.split(",") if args.variants else None)
    shard, n_shards = sweep.parse_shard(args.shard)
    mine = runs[shard::n_shards]  # this process trains these; the tables cover all runs
    if args.dry_run:
        for r in mine:
            print(sweep.shell_line(r["command"]))
        return
    if not args.collect_only:
        deadline = time.time() + args.time_budget if args.time_budget else None
        sweep.run_all(mine, deadline=deadline)
    rows = sweep.collect(runs)
    for row, r in zip(rows, runs, strict=True):
        row["variant"] = r["variant"]
        row["complete"] = sweep.is_complete(r["workdir"])
    table = aggregate(rows)
    out = args.out or os.path.join("experiments", "results", f"lm_{args.study}")
    write(args.study, table, rows, out, runs)
    print(open(os.path.join(out, "results.md")).read())


if __name__ == "__main__":
    main()
