"""Paper Table 7: end-to-end generation with a 1.5B model (24 x 2048, N 128), batch 128 on one
GPU: prefill a prompt of L tokens, then decode L tokens; seconds for the prefill and for both.

    python experiments/bench_generate.py                      # GPU: L = 512 ... 16384
    python experiments/bench_generate.py --lengths 512,2048 --models siso --write-docs
    python experiments/bench_generate.py --smoke              # tiny model on the CPU

Random weights in bf16 (inference), the SSM state in `--state_dtype` (fp32 by default), vocab
100,352 (cl100k rounded up; the paper uses Llama-3.1's 128K, so our logits are a little cheaper).
The prompt is fed in pieces of `--piece` tokens, each one jitted call of the same shape carrying
the cache (one compilation for every L); decoding is one jitted `fori_loop` whose trip count is
an argument (one compilation for every L). Each row also gives two floors from ceilings measured
in the same run: prefill FLOPs (2 x parameters x tokens) over the bf16 matmul rate, and decode
bytes (every weight and the whole cache read and written per token) over the copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba3_jax.benchmark import (  # noqa: E402
    device_name,
    git_commit,
    markdown_table,
    measure_copy_bandwidth,
    measure_matmul_rate,
    publish,
    tree_nbytes,
)
from mamba3_jax.config import ModelConfig  # noqa: E402
from mamba3_jax.model import Mamba3LM  # noqa: E402

# paper Table 7 (seconds, one H100): model -> {L: (prefill, prefill + decode)}
PAPER = {
    "mamba2": {512: (0.51, 4.66), 1024: (1.02, 9.32), 2048: (2.02, 18.62), 4096: (4.02, 37.22),
               16384: (16.22, 149.02)},
    "siso": {512: (0.51, 4.39), 1024: (1.01, 8.78), 2048: (2.02, 17.57), 4096: (4.01, 35.11),
             16384: (16.22, 140.61)},
    "mimo": {512: (0.60, 4.74), 1024: (1.21, 9.48), 2048: (2.42, 18.96), 4096: (4.76, 37.85),
             16384: (19.44, 151.81)},
}
MODELS = {
    "mamba2": dict(mixer="mamba2", d_conv=4, rotation="none", d_mlp=4096),
    "siso": dict(d_mlp=4096),
    "mimo": dict(mimo_rank=4, d_mlp=3824),
}
SECTION = "## End-to-end generation (paper Table 7)"


def model_config(name: str, state_dtype: str, smoke: bool) -> ModelConfig:
    size = (dict(vocab_size=256, d_model=64, n_layer=2, headdim=16, d_state=16) if smoke else
            dict(vocab_size=100_352, d_model=2048, n_layer=24, headdim=64, d_state=128))
    over = dict(MODELS[name])
    if smoke:
        over["d_mlp"] = 128
    return ModelConfig(expand=2, mlp_multiple_of=1, dtype="bfloat16", param_dtype="bfloat16",
                       state_dtype=state_dtype, **size, **over)


def build_fns(model: Mamba3LM):
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill_piece(state, tokens, cache):
        m = nnx.merge(graphdef, state)
        h, cache = m.features(tokens, cache=cache)
        return m.logits(h[:, -1]), cache

    @jax.jit
    def decode(state, token, cache, steps):
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            tok, c = carry
            logits, c = m.step(tok, c)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), c

        return jax.lax.fori_loop(0, steps, body, (token, cache))

    return state, prefill_piece, decode


def run_length(model, fns, batch: int, L: int, piece: int, key):
    state, prefill_piece, decode = fns
    prompt = jax.random.randint(key, (batch, L), 0, model.cfg.vocab_size)
    pieces = [prompt[:, i:i + piece] for i in range(0, L, piece)]
    jax.block_until_ready(pieces)
    t0 = time.perf_counter()
    cache = model.init_cache(batch)
    for p in pieces:
        logits, cache = prefill_piece(state, p, cache)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    token, cache = decode(state, token, cache, L)
    jax.block_until_ready(token)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="siso,mimo,mamba2")
    ap.add_argument("--lengths", default="512,1024,2048,4096,16384")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--piece", type=int, default=512, help="prompt tokens per prefill call")
    ap.add_argument("--state_dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    lengths = [int(s) for s in args.lengths.split(",")]
    if args.smoke:
        args.batch, args.piece, lengths = 2, 8, [8, 24]
    elif jax.default_backend() not in ("gpu", "cuda"):
        sys.exit("the benchmark needs a GPU (use --smoke on the CPU)")
    bw = measure_copy_bandwidth((1 << 22) if args.smoke else (1 << 30))
    mm = measure_matmul_rate(256 if args.smoke else 8192)
    print(f"{device_name()}, jax {jax.__version__}, commit {git_commit()}; copy "
          f"{bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            sys.exit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        cfg = model_config(name, args.state_dtype, args.smoke)
        model = Mamba3LM(cfg, rngs=nnx.Rngs(0))
        fns = build_fns(model)
        n_params = sum(x.size for x in jax.tree.leaves(fns[0]))
        param_bytes = tree_nbytes(fns[0])
        cache_bytes = tree_nbytes(jax.eval_shape(functools.partial(model.init_cache, args.batch)))
        run_length(model, fns, args.batch, min(lengths), args.piece,
                   jax.random.PRNGKey(0))  # compile both functions
        for L in lengths:
            pre_s, total_s = run_length(model, fns, args.batch, L, args.piece,
                                        jax.random.PRNGKey(L))
            pre_floor = 2 * n_params * args.batch * L / mm
            dec_floor = L * (param_bytes + 2 * cache_bytes) / bw
            paper = PAPER[name].get(L)
            rows.append([name, L, f"{pre_s:.3f}", f"{total_s:.3f}",
                         f"{pre_floor:.3f} / {pre_floor + dec_floor:.3f}",
                         "-" if paper is None else f"{paper[0]:.2f} / {paper[1]:.2f}",
                         "-" if paper is None else f"{paper[1] / total_s:.2f}x"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = ["model", "L", "prefill s", "prefill + decode s", "floors s (prefill / both)",
              "paper s (prefill / both)", "our speed-up (both)"]
    table = markdown_table(header, rows)
    command = "python experiments/bench_generate.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    intro = (f"Device: {device_name()}; jax {jax.__version__}; commit {git_commit()}; command: "
             f"`{command.strip()}`; batch {args.batch}, prompt pieces of {args.piece}, state "
             f"{args.state_dtype}; copy {bw / 1e12:.2f} TB/s and bf16 matmul "
             f"{mm / 1e12:.0f} TFLOP/s measured in the same run.")
    publish(intro, table, out_name="bench_generate.md", section=SECTION,
            write_docs=args.write_docs,
            doc_preamble=__doc__.split("\n\n")[0].replace("\n", " ") + "\n\n")
    return rows


if __name__ == "__main__":
    main()
