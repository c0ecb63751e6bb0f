"""Paper Table 7: end-to-end generation with a 1.5B model (24 x 2048, N 128), batch 128 on one
GPU: prefill a prompt of L tokens, then decode L tokens; seconds for the prefill and for both.

    python experiments/bench_generate.py                      # GPU: L = 512 ... 16384
    python experiments/bench_generate.py --lengths 512,2048 --models siso --write-docs
    python experiments/bench_generate.py --smoke              # tiny model on the CPU

Random weights in bf16 (inference), the SSM state in `--state_dtype` (fp32 by default), vocab
100,352 (cl100k rounded up; the paper uses Llama-3.1's 128K, so our logits are a little cheaper).
The prompt is fed in pieces of `--piece` tokens, each one jitted call of the same shape carrying
the cache (one compilation for every L); decoding is one jitted `fori_loop` whose trip count is
an argument (one compilation for every L).

Floors, from ceilings measured in the same run (`mamba3_jax.benchmark.measure_ceilings`: the
fastest device copy, JAX / torch / cupy, and the fastest 8192^3 bf16 matmul): prefill, the
matmul FLOPs (2 per weight per token; the tied embedding's logits for the last position only)
over the matmul rate, or the weights and cache moved once over the copy rate if slower; decode,
per token, every weight and the whole cache read and the cache written over the copy rate (or
2 FLOPs per weight per row over the matmul rate if slower). Each time is printed beside its floor
and as a % of it. The paper's H100 seconds are shown as a % of the H100 floor of its model (ours
with Llama-3.1's 128,256-token vocabulary) at an assumed 3.0 TB/s copy and 790 TFLOP/s bf16
matmul (measured on an H100 in earlier runs, not in this one): compare the percentages, not the
seconds. One model over all lengths takes ~3 minutes on one H200; run one model per call.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba3_jax.benchmark import (  # noqa: E402
    H100_COPY_BYTES_PER_S,
    H100_MATMUL_FLOPS,
    CompileWatch,
    announce_ceilings,
    device_name,
    git_commit,
    markdown_table,
    percent_of_floor,
    publish,
    roofline_s,
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
PAPER_VOCAB = 128_256  # Llama-3.1's tokenizer, which the paper's model uses


class Sizes(NamedTuple):
    """What the floors need of a model: weights (all, and the tied embedding), their bytes, and
    the bytes of its decode cache at the benchmark's batch."""

    n_params: int
    n_embed: int
    param_bytes: int
    cache_bytes: int

    def with_vocab(self, vocab: int, old_vocab: int, d_model: int, itemsize: int) -> "Sizes":
        extra = (vocab - old_vocab) * d_model
        return self._replace(n_params=self.n_params + extra, n_embed=self.n_embed + extra,
                             param_bytes=self.param_bytes + extra * itemsize)


def floors_s(z: Sizes, batch: int, L: int, copy_rate: float,
             matmul_rate: float) -> tuple[float, float]:
    """(prefill floor, decode floor) in seconds for a prompt of L tokens then L new tokens."""
    prefill_flops = 2.0 * (z.n_params - z.n_embed) * batch * L + 2.0 * z.n_embed * batch
    prefill = roofline_s(z.param_bytes + z.cache_bytes, prefill_flops, copy_rate, matmul_rate)
    per_token = roofline_s(z.param_bytes + 2 * z.cache_bytes, 2.0 * z.n_params * batch,
                           copy_rate, matmul_rate)
    return prefill, L * per_token


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


def run_length(model, fns, batch: int, L: int, piece: int, key, warmup: bool = False):
    state, prefill_piece, decode = fns
    prompt = jax.random.randint(key, (batch, L), 0, model.cfg.vocab_size)
    pieces = [prompt[:, i:i + piece] for i in range(0, L, piece)]
    jax.block_until_ready(pieces)
    with CompileWatch() as watch:  # a compile here would be timed: reported with the row
        t0 = time.perf_counter()
        cache = model.init_cache(batch)
        for p in pieces:
            logits, cache = prefill_piece(state, p, cache)
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        if not warmup:  # a run stopped during the decode still leaves the prefill's time
            print(f"L={L}: prefill {t1 - t0:.3f} s, decoding {L} tokens", flush=True)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        token, cache = decode(state, token, cache, L)
        jax.block_until_ready(token)
        t2 = time.perf_counter()
    if watch.count and not warmup:
        print(f"warning: L={L}: {watch.count} compilation(s), {watch.seconds:.1f} s, inside the "
              "timed region: " + "; ".join(watch.what), flush=True)
    return t1 - t0, t2 - t0, watch


# A length is timed again when compiles inside its timed region took more than this fraction of
# it: session 11's MIMO L = 16384 spent 0.3 s compiling six scalar jits in a run of minutes,
# and timing it again did not fit the call.
RETIME_FRACTION = 0.01
WARMUP_PIECES = 2  # prompt pieces the warm-up prefills (the first piece and one after it)


def retime(watch, total_s: float) -> bool:
    return watch.count > 0 and watch.seconds > RETIME_FRACTION * total_s


COLUMNS = ["model", "L", "prefill s (floor, %)", "decode s (floor, %)",
           "prefill + decode s (floor, %)", "paper H100 prefill s (% of floor)",
           "paper H100 prefill + decode s (% of floor)", "ours / paper (% of floor, both)"]


def table_row(r: dict) -> list:
    def cell(t, floor):
        return f"{t:.3f} ({floor:.3f}, {percent_of_floor(t, floor):.0f}%)"

    ours = [r["model"], r["L"], cell(r["prefill"], r["prefill_floor"]),
            cell(r["decode"], r["decode_floor"]), cell(r["total"], r["total_floor"])]
    if r["paper"] is None:
        return ours + ["-", "-", "-"]
    (p_pre, p_tot), (pct_pre, pct_tot) = r["paper"], r["paper_pct"]
    mine = percent_of_floor(r["total"], r["total_floor"])
    return ours + [f"{p_pre:.2f} ({pct_pre:.0f}%)", f"{p_tot:.2f} ({pct_tot:.0f}%)",
                   f"{mine / pct_tot:.2f}"]


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
        args.batch, args.piece, lengths = 2, 8, [16, 24]
    elif jax.default_backend() not in ("gpu", "cuda"):
        sys.exit("the benchmark needs a GPU (use --smoke on the CPU)")
    t_start = time.perf_counter()
    ceil = announce_ceilings(args.smoke)
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            sys.exit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        cfg = model_config(name, args.state_dtype, args.smoke)
        model = Mamba3LM(cfg, rngs=nnx.Rngs(0))
        fns = build_fns(model)
        sizes = Sizes(n_params=sum(x.size for x in jax.tree.leaves(fns[0])),
                      n_embed=cfg.vocab_size * cfg.d_model, param_bytes=tree_nbytes(fns[0]),
                      cache_bytes=tree_nbytes(jax.eval_shape(
                          functools.partial(model.init_cache, args.batch))))
        paper_sizes = sizes.with_vocab(PAPER_VOCAB, cfg.vocab_size, cfg.d_model, 2)  # bf16
        # compile both functions on two prompt pieces: the decode's trip count is an argument,
        # so a short warm-up compiles what every L runs (a warm-up at min(lengths) ran the whole
        # L = 16384 twice for `--lengths 16384` and did not fit a 10-minute call); two pieces,
        # because a piece that takes a prefilled cache compiles again (session 13: a one-piece
        # warm-up left a 20 s compile in the timed L = 16384, which was then timed twice)
        run_length(model, fns, args.batch, min(WARMUP_PIECES * args.piece, min(lengths)),
                   args.piece, jax.random.PRNGKey(0), warmup=True)
        for L in lengths:
            pre_s, total_s, compiles = run_length(model, fns, args.batch, L, args.piece,
                                                  jax.random.PRNGKey(L))
            if retime(compiles, total_s):  # the compile is not the model's time
                print(f"L={L}: timed again", flush=True)
                pre_s, total_s, compiles = run_length(model, fns, args.batch, L, args.piece,
                                                      jax.random.PRNGKey(L))
            pre_floor, dec_floor = floors_s(sizes, args.batch, L, ceil.copy, ceil.matmul)
            label = L if not compiles.count else (
                f"{L} ({compiles.seconds:.1f} s compile timed, "
                f"{100 * compiles.seconds / total_s:.1f}%)")
            r = dict(model=name, L=label, prefill=pre_s,
                     decode=total_s - pre_s, total=total_s,
                     prefill_floor=pre_floor, decode_floor=dec_floor,
                     total_floor=pre_floor + dec_floor, paper=PAPER[name].get(L))
            if r["paper"] is not None:
                h_pre, h_dec = floors_s(paper_sizes, args.batch, L, H100_COPY_BYTES_PER_S,
                                        H100_MATMUL_FLOPS)
                r["paper_pct"] = (percent_of_floor(r["paper"][0], h_pre),
                                  percent_of_floor(r["paper"][1], h_pre + h_dec))
            rows.append(r)
            print(f"[{time.perf_counter() - t_start:.0f}s] "
                  + " | ".join(str(c) for c in table_row(r)), flush=True)
    table = markdown_table(COLUMNS, [table_row(r) for r in rows])
    command = "python experiments/bench_generate.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    intro = (f"Device: {device_name()}; jax {jax.__version__}; commit {git_commit()}; command: "
             f"`{command.strip()}`; batch {args.batch}, prompt pieces of {args.piece}, state "
             f"{args.state_dtype}; ceilings measured in the same run: {ceil.summary()}; "
             f"{time.perf_counter() - t_start:.0f} s in all. Each time: seconds (floor, % of "
             f"floor). Paper: its H100 seconds (% of the H100 floor of its model at an assumed "
             f"{H100_COPY_BYTES_PER_S / 1e12:.1f} TB/s copy and "
             f"{H100_MATMUL_FLOPS / 1e12:.0f} TFLOP/s bf16 matmul); the last column is our % of "
             f"floor over the paper's (> 1: closer to the device's floor than the paper).")
    publish(intro, table, out_name="bench_generate.md", section=SECTION,
            write_docs=args.write_docs,
            doc_preamble=__doc__.split("\n\n")[0].replace("\n", " ") + "\n\n")
    return rows


if __name__ == "__main__":
    main()
