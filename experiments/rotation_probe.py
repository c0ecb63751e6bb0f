"""Does a trained Mamba-3 count with exact rotations? (issue 13, modular arithmetic)

Trains one `mod_sum` cell (sums mod 5, `d +- d +- ... +- d`, two layers, the CPU preset's model
and curriculum up to length 24, one learning rate), evaluates it at the longest training length
and at a longer one, then reads the rotation the trained model applies at every token: each
layer's cumulative angle (the decode state) after every token, differenced. A term (operator
and digit) should turn a counting channel by +-c d 2 pi / 5 for some integer c, so that the
angle after n terms encodes the sum whatever n is. Per layer and rotary pair the script prints
the best c, the RMS distance of the mean rotation of each (operator, digit) term from +-c d,
its mean bias and the spread of the rotation over contexts, in units of 2 pi / 5 (an error of
0.5 after the terms of a string is a wrong answer).

    python experiments/rotation_probe.py --seed 0 --weight_decay 0      # ~2 minutes on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import state_tracking  # noqa: E402

from mamba3_jax.tasks import get_task, make_batch  # noqa: E402
from mamba3_jax.tasks.state_tracking import DIGIT0, MINUS, MODULUS, PLUS  # noqa: E402

UNIT = 2 * np.pi / MODULUS  # one step of the counter


def rotation_increments(model, tokens: np.ndarray) -> np.ndarray:
    """(layers, T, B, H, S): the angle each layer's state turns by at each token, in (-pi, pi]
    (decode steps from an empty cache over tokens (B, T), no padding)."""
    step = nnx.jit(lambda m, t, c: m.step(t, c))
    cache = model.init_cache(tokens.shape[0])
    angles = []
    for t in range(tokens.shape[1]):
        _, cache = step(model, jnp.asarray(tokens[:, t]), cache)
        angles.append(np.stack([np.asarray(c.ssm.angle) for c in cache]))
    a = np.stack(angles, axis=1)
    turned = np.diff(np.concatenate([np.zeros_like(a[:, :1]), a], axis=1), axis=1)
    return np.angle(np.exp(1j * turned))


def counter_fit(inc: np.ndarray, tokens: np.ndarray) -> list[dict]:
    """Every (layer, pair) as a Z5 counter: the rotation of each term (operator at odd column,
    digit after it) averaged over contexts (circular mean), against +-c d UNIT for the best c.
    Rows sorted by RMS error, in units of UNIT. inc: (layers, T, B, H, S) of one head's view
    (the pairs' angles are shared by the heads when they are not scaled by dt)."""
    ops, digits = tokens[:, 1::2], tokens[:, 2::2]
    rows = []
    for layer in range(inc.shape[0]):
        for pair in range(inc.shape[-1]):
            x = inc[layer, :, :, 0, pair].T  # (B, T)
            term = x[:, 1::2][:, :digits.shape[1]] + x[:, 2::2]
            means, spreads, signed = [], [], []
            for op, sign in ((PLUS, 1), (MINUS, -1)):
                for d in range(MODULUS):
                    sel = (ops[:, :digits.shape[1]] == op) & (digits == DIGIT0 + d)
                    if not sel.any():
                        continue
                    z = np.exp(1j * term[sel]).mean()
                    means.append(np.angle(z))
                    spreads.append(np.sqrt(max(-2.0 * np.log(max(abs(z), 1e-12)), 0.0)))
                    signed.append(sign * d)
            means, signed = np.array(means), np.array(signed)
            for c in range(1, MODULUS):
                dev = np.angle(np.exp(1j * (means - c * signed * UNIT))) / UNIT
                rows.append(dict(layer=layer, pair=pair, c=c, rms=float(np.sqrt(np.mean(dev**2))),
                                 bias=float(dev.mean()),
                                 spread=float(np.mean(spreads) / UNIT)))
    return sorted(rows, key=lambda r: r["rms"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight_decay", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps_per_stage", type=int, default=1000)
    ap.add_argument("--eval_length", type=int, default=64)
    ap.add_argument("--probe_length", type=int, default=63, help="odd: d op d ... d")
    ap.add_argument("--top", type=int, default=3, help="channels printed")
    ap.add_argument("--paper_rotation", action="store_true",
                    help="tied embeddings and the angle scaled by dt (the LM rule; the probe "
                         "then reads head 0's angles)")
    args = ap.parse_args(argv)
    if args.probe_length < 3 or args.probe_length % 2 == 0:
        raise SystemExit(f"--probe_length wants an odd number >= 3, got {args.probe_length}")
    p = dataclasses.replace(state_tracking.PRESETS["cpu"], lrs=(args.lr,),
                            weight_decay=args.weight_decay, eval_length=args.eval_length,
                            steps_per_stage=args.steps_per_stage)
    if args.paper_rotation:
        p = dataclasses.replace(p, tie_embeddings=True, rotation_dt=True)
    if args.steps_per_stage * len(p.stage_lengths) <= p.warmup:
        raise SystemExit(f"--steps_per_stage {args.steps_per_stage}: the {len(p.stage_lengths)} "
                         f"stages must outlast the warm-up ({p.warmup} steps)")
    kept = {}
    r = state_tracking.train_cell("mod_sum", "mamba3", p, seed=args.seed, log=lambda *_: None,
                                  on_trained=lambda sweep: kept.update(sweep=sweep))
    sweep = kept["sweep"]
    model = nnx.merge(sweep.graphdef, jax.tree.map(lambda a: a[0], sweep.params), sweep.frozen)
    batch = make_batch(get_task("mod_sum"), np.random.default_rng(args.seed + 7), 256,
                       args.probe_length, args.probe_length)
    tokens = batch["inputs"][:, -1 - args.probe_length:-1]  # the expression, no padding
    rows = counter_fit(rotation_increments(model, tokens), tokens)
    print(f"mod_sum, seed {args.seed}, weight decay {args.weight_decay}, lr {args.lr}"
          f"{', paper rotation' if args.paper_rotation else ''}: "
          f"scaled accuracy {r['scaled_acc_train_length_per_lr'][0]:.1f} at length "
          f"{r['train_length']} (training), {r['scaled_acc']:.1f} at {args.eval_length}")
    print("best counting channels (units of 2 pi / 5 per term):")
    for c in rows[:args.top]:
        print(f"  layer {c['layer']} pair {c['pair']} c={c['c']}: RMS {c['rms']:.3f}, bias "
              f"{c['bias']:+.3f}, spread over contexts {c['spread']:.3f}")
    return dict(result=r, channels=rows)


if __name__ == "__main__":
    main()
