"""Diagnose Mamba-3 on parity (docs/tasks.md "Why parity failed"): what the one-layer model does
with the tokens "0" and "1" at initialisation and after training.

For a 1-layer model the mixer's input at a token depends on the token only, so dt, A*dt and the
rotation per step of every head can be read off the embedding and in_proj exactly. Per learning
rate it prints: cos(x0, x1) of the normed inputs of "0" and "1"; dt per head for "0" (dt0) and
"1" (dt1); A*dt for "1"; the largest |angle per step| / pi of token "1" and the (head, angle)
pair nearest to the parity solution (inc0 = 0, inc1 = pi mod 2 pi).

    python experiments/parity_probe.py --init_only --seeds 0,1,2,3,4,5,6,7 --paper_rotation
    python experiments/parity_probe.py --preset cpu --seed 1 --every 300 --paper_rotation
    python experiments/parity_probe.py --preset cpu --seed 1 --every 300
    python experiments/parity_probe.py --preset cpu --seed 1 --cfg '{"dt_min": 0.5, "dt_max": 2.0}'
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
from flax import nnx

from mamba3_jax.model import Mamba3LM
from mamba3_jax.tasks import curriculum, get_task, make_batch, scaled_accuracy
from mamba3_jax.training.lr_sweep import LRSweep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import state_tracking as st  # noqa: E402


def token_stats(params, cfg, k: int = 0) -> dict:
    """dt, A*dt and angle increments / pi for every token of copy k of a 1-layer model."""
    p = jax.tree.map(lambda a: np.asarray(a[k]), params)
    emb, lay = p["embed"]["embedding"], p["layers"][0]
    x = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * lay["norm1"]["weight"]
    z = x @ lay["mixer"]["in_proj"]["kernel"]
    out, s = {}, 0
    for name, w in cfg.in_proj_splits:
        out[name] = z[:, s:s + w]
        s += w
    dt = np.logaddexp(0.0, out["dd_dt"] + lay["mixer"]["dt_bias"])
    A = np.minimum(-np.logaddexp(0.0, out["dd_A"]), -cfg.a_floor)
    e0, e1 = x[1], x[2]
    res = {"cos01": float(e0 @ e1 / np.linalg.norm(e0) / np.linalg.norm(e1)), "dt": dt,
           "Adt": A * dt}
    if "angles" in out:
        scale = dt if cfg.rotation_dt else np.ones_like(dt)
        res["inc_over_pi"] = np.tanh(out["angles"])[:, None, :] * scale[:, :, None]  # (V, H, S)
    return res


def describe(s: dict) -> str:
    line = (f"cos(x0,x1) {s['cos01']:.3f} dt0 {np.round(s['dt'][1], 3)} "
            f"dt1 {np.round(s['dt'][2], 3)} Adt1 {np.round(s['Adt'][2], 3)}")
    if "inc_over_pi" in s:
        d = s["inc_over_pi"]
        e1 = np.abs((d[2] % 2) - 1)  # distance of inc1/pi to an odd number
        e0 = np.abs(((d[1] + 1) % 2) - 1)  # distance of inc0/pi to an even number
        h, j = np.unravel_index(np.argmin(e1 + e0), e1.shape)
        line += (f" | max|inc1|/pi {np.abs(d[2]).max():.3f} best pair h{h} a{j}: "
                 f"inc0/pi {d[1, h, j]:.3f} inc1/pi {d[2, h, j]:.3f}")
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(st.PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="with --init_only: comma-separated seeds")
    ap.add_argument("--variant", default="mamba3", choices=sorted(st.VARIANTS))
    ap.add_argument("--paper_rotation", action="store_true",
                    help="tied embeddings, angle pi tanh(angles) dt (as state_tracking.py)")
    ap.add_argument("--cfg", default="{}", help="JSON ModelConfig overrides")
    ap.add_argument("--pre", default="{}", help="JSON Preset overrides")
    ap.add_argument("--every", type=int, default=0, help="report every N steps")
    ap.add_argument("--init_only", action="store_true")
    ap.add_argument("--eval_lengths", default="",
                    help="comma-separated extra evaluation lengths after training, e.g. 64,128")
    a = ap.parse_args(argv)
    p = dataclasses.replace(st.PRESETS[a.preset], **json.loads(a.pre))
    if a.paper_rotation:
        p = dataclasses.replace(p, tie_embeddings=True, rotation_dt=True)
    task = get_task("parity")
    cfg = dataclasses.replace(st.model_config("parity", a.variant, p, task.vocab_size),
                              **json.loads(a.cfg))
    if a.init_only:
        for seed in ([int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]):
            params = nnx.to_pure_dict(nnx.split(Mamba3LM(cfg, rngs=nnx.Rngs(seed)),
                                                nnx.Param, ...)[1])
            params = jax.tree.map(lambda v: np.asarray(v)[None], params)
            print(f"seed {seed} init: {describe(token_stats(params, cfg))}", flush=True)
        return
    total = p.steps_per_stage * len(p.stage_lengths)
    sweep = LRSweep(cfg, p.lrs, total, warmup=p.warmup, weight_decay=p.weight_decay, seed=a.seed)
    answer_ids = jnp.asarray(task.answer_token_ids)

    def predict(model, inputs, positions):
        return jnp.argmax(model(inputs, positions=positions)[:, -1][:, answer_ids], axis=-1)

    evaluate = sweep.apply(predict)

    def accuracy(n_batches, length=p.eval_length):
        correct, count = np.zeros(len(p.lrs)), 0
        erng = np.random.default_rng(a.seed + 12345)  # the evaluation of state_tracking.py
        for _ in range(n_batches):
            b = make_batch(task, erng, p.batch_size, length, length)
            pred = np.asarray(evaluate(b["inputs"], b["positions"]))
            correct += (pred == b["answers"][None]).sum(1)
            count += len(b["answers"])
        return 100 * np.asarray(scaled_accuracy(correct / count, task.num_classes))

    def show(tag):
        if cfg.mixer != "mamba3":
            return
        for k, lr in enumerate(p.lrs):
            print(f"{tag} lr {lr:.1e}: {describe(token_stats(sweep.params, cfg, k))}", flush=True)

    lengths_at = curriculum(p.stage_lengths, p.steps_per_stage, p.min_len)
    rng = np.random.default_rng(a.seed)  # the training stream of state_tracking.py
    pad_to = max(p.stage_lengths) + 1
    show("init")
    t0 = time.time()
    for step in range(total):
        lo, hi = lengths_at(step)
        losses = sweep.step(make_batch(task, rng, p.batch_size, lo, hi, pad_to=pad_to), step)
        if a.every and (step + 1) % a.every == 0 and step + 1 < total:
            print(f"step {step + 1} loss per lr {np.round(np.asarray(losses), 3).tolist()} "
                  f"scaled acc@{p.eval_length} (1 batch) {np.round(accuracy(1), 1).tolist()} "
                  f"({time.time() - t0:.0f}s)", flush=True)
            show(f"step {step + 1}")
    print(f"final seed {a.seed} loss per lr {np.round(np.asarray(losses), 3).tolist()} "
          f"scaled acc@{p.eval_length} per lr {np.round(accuracy(p.eval_batches), 2).tolist()} "
          f"({time.time() - t0:.0f}s)", flush=True)
    for length in [int(x) for x in a.eval_lengths.split(",") if x]:
        acc = np.round(accuracy(p.eval_batches, length), 2).tolist()
        print(f"scaled acc@{length} per lr {acc}", flush=True)
    show("final")


if __name__ == "__main__":
    main()
