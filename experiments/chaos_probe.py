"""Is which run learns a state-tracking task a property of its seed? (issue 13)

Trains the CPU-scale `mod_sum` cell (experiments/rotation_probe.py's: two layers, curriculum to
length 24, 1,000 steps a stage, evaluated at 64) at one learning rate twice per seed: alone, and
as the first of two vmapped copies (`LRSweep`) whose second copy trains at another rate. Both
copies start from the seed's weights and see the seed's batches, and the copies do not interact,
so the two runs of the first rate compute the same updates up to rounding (a batched matmul sums
in another order). One JSON line per run: scaled accuracy at the longest training length and at
64, final training loss.

    python experiments/chaos_probe.py --seeds 0,1,2,3        # ~15 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import state_tracking  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--other_lr", type=float, default=3e-3, help="the second vmapped copy's")
    ap.add_argument("--steps_per_stage", type=int, default=1000)
    args = ap.parse_args(argv)
    preset = dataclasses.replace(state_tracking.PRESETS["cpu"], eval_length=64,
                                 steps_per_stage=args.steps_per_stage)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for lrs in ((args.lr,), (args.lr, args.other_lr)):
            t0 = time.time()
            r = state_tracking.train_cell("mod_sum", "mamba3", dataclasses.replace(
                preset, lrs=lrs), seed=seed, log=lambda *_: None)
            row = dict(seed=seed, lr=args.lr, copies=len(lrs),
                       acc_train_length=round(r["scaled_acc_train_length_per_lr"][0], 2),
                       acc_64=round(r["scaled_acc_per_lr"][0], 2),
                       final_loss=round(r["final_loss_per_lr"][0], 4),
                       seconds=round(time.time() - t0))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
