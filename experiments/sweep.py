r"""Run a sweep of training runs and collect a results table and plot.

    # print the launch commands (e.g. to submit them to a cluster yourself)
    python experiments/sweep.py --config configs/small_gpu.py --workdir runs/sweep \
        --sweep model.d_state=16,32,64,128 --sweep model.mimo_rank=1,4 --dry_run

    # run them one after another here, then write runs/sweep/results.{md,csv,png}
    python experiments/sweep.py --config configs/small_gpu.py --workdir runs/sweep \
        --sweep model.d_state=16,32,64,128 --sweep model.mimo_rank=1,4 --set train.steps=2000

    # only (re)collect the table and plot from the runs' metrics.jsonl
    python experiments/sweep.py --workdir runs/sweep --collect_only

Each point gets its own workdir `<workdir>/<name>` (e.g. `d_state=16+mimo_rank=4`), so a sweep
that is interrupted resumes: complete runs are skipped and the others resume from their
checkpoints. See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba3_jax.training import sweep  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training config file (configs/*.py[:arg])")
    p.add_argument("--workdir", required=True, help="sweep directory (one subdir per run)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept config key; several --sweep flags form a grid")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override applied to every run")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--collect_only", action="store_true",
                   help="only write results.{md,csv,png} from existing runs")
    p.add_argument("--stop_on_error", action="store_true", help="stop at the first failed run")
    args = p.parse_args(argv)

    spec_path = os.path.join(args.workdir, "sweep.json")
    if args.collect_only and not args.sweep and os.path.exists(spec_path):
        with open(spec_path, encoding="utf-8") as f:
            spec = json.load(f)
        config, axes, fixed = spec["config"], [tuple(a) for a in spec["axes"]], spec["fixed"]
    else:
        if not args.config:
            p.error("--config is required (unless --collect_only finds sweep.json)")
        config = args.config
        try:
            axes = [sweep.parse_axis(s) for s in args.sweep]
            fixed = dict(sweep.parse_fixed(s) for s in args.set)
        except ValueError as e:
            p.error(str(e))
    try:
        runs = sweep.plan(config, args.workdir, axes, fixed)
    except ValueError as e:
        p.error(str(e))

    if args.dry_run:
        for r in runs:
            print(sweep.shell_line(r["command"]))
        return 0
    failed = []
    if not args.collect_only:
        sweep.write_spec(args.workdir, config, axes, fixed, runs)
        codes = sweep.run_all(runs, keep_going=not args.stop_on_error)
        failed = [n for n, c in codes.items() if c]
    out = sweep.write_results(runs, args.workdir)
    print(open(out["md"], encoding="utf-8").read())
    print("[sweep] wrote " + ", ".join(out.values()))
    if failed:  # the table is still written; the exit code tells scripts and CI
        print(f"[sweep] {len(failed)} of {len(runs)} runs failed: {failed} (see their train.log)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
