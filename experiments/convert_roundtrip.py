"""Round trip of a trained run through the official PyTorch format, with the command line.

    python experiments/convert_roundtrip.py RUN_DIR --out OUT_DIR [--force] \
        [--a_activation softplus] [--mamba-repo /path/to/state-spaces/mamba]

Runs `python -m mamba3_jax.convert` four times: RUN_DIR -> OUT_DIR/model.safetensors and
OUT_DIR/model.bin (torch.save; config.json beside them), then each back to a run
(OUT_DIR/back_st unrolled, OUT_DIR/back_bin with --scan_layers). Loads the three runs with
`mamba3_jax.load.load_model` and prints the max |logits| difference of each round trip against
the original on two sentences of 64 bytes (tokens), and whether the two files hold the same
arrays. With --mamba-repo (a state-spaces/mamba checkout; needs CPU torch and einops), also the
official model's math on the exported state dict (`compare_official.reference_lm`: the
`MambaLMHeadModel` glue in torch, mixers by the reference functions) against our logits.
--force / --a_activation are passed to the export / the imports (a softplus Mamba-3 model).
The last line is `RESULT {json}`. Exit 1 if a round trip differs by more than --tol.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXT = ["It was the best of times, it was the worst of times, it was the age of wisdom, it",
        "Call me Ishmael. Some years ago - never mind how long precisely - having little or"]


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "mamba3_jax.convert", *args]
    print("$ python -m mamba3_jax.convert " + " ".join(args), flush=True)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print((p.stdout + p.stderr).strip(), flush=True)
    if p.returncode:
        raise SystemExit(f"convert failed (exit {p.returncode})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--a_activation", default=None)
    ap.add_argument("--mamba-repo", type=Path, default=None)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from mamba3_jax.convert import config_from_official, read_state_dict
    from mamba3_jax.load import load_model

    os.makedirs(args.out, exist_ok=True)
    st, pt = os.path.join(args.out, "model.safetensors"), os.path.join(args.out, "model.bin")
    force = ["--force"] if args.force else []
    act = ["--a_activation", args.a_activation] if args.a_activation else []
    back = {"safetensors -> run": os.path.join(args.out, "back_st"),
            "bin -> run (scan_layers)": os.path.join(args.out, "back_bin")}
    for d in back.values():
        shutil.rmtree(d, ignore_errors=True)
    cli("--from", args.run, "--to", st, *force)
    cli("--from", args.run, "--to", pt, *force)
    cli("--from", st, "--to", back["safetensors -> run"], *act)
    cli("--from", pt, "--to", back["bin -> run (scan_layers)"], "--scan_layers", *act)

    orig = load_model(args.run)
    tokens = jnp.asarray([orig.tokenizer.encode(t)[:64] for t in TEXT], jnp.int32)
    ref = np.asarray(orig.model(tokens), np.float64)
    res = {"run": args.run, "step": orig.step, "model": orig.model.cfg.describe(),
           "max_abs_logit": float(np.abs(ref).max())}
    bad = False
    for name, d in back.items():
        m = load_model(d).model
        diff = float(np.abs(np.asarray(m(tokens), np.float64) - ref).max())
        res[name] = diff
        bad |= diff > args.tol
        print(f"{name}: max |logits - original| = {diff:.3g} ({m.cfg.describe()}, "
              f"a_activation {m.cfg.a_activation})", flush=True)
    a, b = read_state_dict(st), read_state_dict(pt)
    res["same arrays in both files"] = a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k]) for k in a)
    print("safetensors and .bin hold the same arrays:", res["same arrays in both files"])
    if args.mamba_repo is not None:
        import torch

        sys.path.insert(0, str(REPO / "experiments"))
        import compare_official as co

        with open(os.path.join(args.out, "config.json"), encoding="utf-8") as f:
            cfg = config_from_official(json.load(f),
                                       vocab_size=a["backbone.embedding.weight"].shape[0])
        L = tokens.shape[1] // co.REF_CHUNK * co.REF_CHUNK  # the MIMO chunk ref's multiple
        official = co.tnp(co.reference_lm(co.Reference(args.mamba_repo.resolve()),
                                          co.Torch(torch.float64), a,
                                          np.asarray(tokens[:, :L]), cfg))
        diff = float(np.abs(official - ref[:, :L]).max())
        res["official math vs ours"] = diff
        print(f"official math on the exported weights vs ours: max |diff| {diff:.3g} "
              f"(relative {diff / np.abs(official).max():.3g})")
    print("RESULT " + json.dumps(res))
    return 1 if bad or not res["same arrays in both files"] else 0


if __name__ == "__main__":
    sys.exit(main())
