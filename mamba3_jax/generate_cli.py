"""Generate text from a trained run (the command line of mamba3_jax.generate).

    python -m mamba3_jax.generate --workdir runs/tiny --prompt "ROMEO:"
    python -m mamba3_jax.generate --workdir runs/tiny --prompt "a" --prompt "b" --seed 1
    python -m mamba3_jax.generate --workdir runs/tiny --prompt_file prompts.txt --step 300 \\
        --temperature 0.7 --top_p 0.9 --max_new_tokens 400

Loads the run's config, tokenizer and newest (or --step) checkpoint with
`mamba3_jax.load.load_model`. One prompt: the prompt is echoed and the continuation streamed as
it is decoded. Several prompts (--prompt repeated, or a file with one prompt per line): decoded
together (prompts of equal token length share a batch) and printed in order at the end. Every
row stops at end-of-text (the tokenizer's EOS) unless --ignore_eos. Bad arguments, a missing run
or checkpoint: one line `error: ...` on stderr and exit status 2, before any weights are read.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument; main() prints it as one `error:` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors as one line too
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m mamba3_jax.generate",
                 description="Generate text from a trained mamba3_jax run.")
    ap.add_argument("--workdir", required=True, help="run directory written by mamba3_jax.train")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument("--prompt", action="append", default=[],
                    help="prompt text; repeat for a batch")
    ap.add_argument("--prompt_file", default=None, help="a file with one prompt per line")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=None, help=">= 1; default off")
    ap.add_argument("--top_p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill_chunk", type=int, default=None,
                    help="prefill the prompt in pieces of this many tokens (bounds memory)")
    ap.add_argument("--ignore_eos", action="store_true", help="do not stop at end-of-text")
    return ap


def read_prompts(args) -> list[str]:
    """The prompts of --prompt and --prompt_file (one per line), in that order."""
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read --prompt_file: {e}") from e
        for i, line in enumerate(lines, 1):
            if not line.strip():
                raise UsageError(f"--prompt_file {args.prompt_file}: line {i} is empty (one "
                                 "prompt per line)")
        prompts += lines
    if not prompts:
        raise UsageError("give at least one prompt (--prompt TEXT or --prompt_file PATH)")
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"prompt {i + 1} is empty")
    return prompts


def decode(tokenizer, ids: Sequence[int], eos_id: Optional[int]) -> str:
    """Text of generated ids, cut at end-of-text; ids the tokenizer does not know (the model's
    vocabulary may be padded beyond it) are skipped."""
    ids = [int(i) for i in ids]
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    ids = [i for i in ids if 0 <= i < tokenizer.vocab_size]
    try:
        return tokenizer.decode(ids)
    except (KeyError, ValueError):  # an unused id inside the vocabulary (cl100k has gaps)
        out = []
        for i in ids:
            try:
                out.append(tokenizer.decode([i]))
            except (KeyError, ValueError):
                pass
        return "".join(out)


def stable_prefix(text: str) -> str:
    """Text safe to print while more tokens may follow: without a trailing replacement char
    (the start of a multi-byte character split over tokens)."""
    return text.rstrip("\ufffd")


def _check_sampling(args, vocab_size: Optional[int] = None) -> None:
    from mamba3_jax.generate import check_sampling

    try:
        check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, prefill_chunk=args.prefill_chunk,
                       vocab_size=vocab_size)
    except ValueError as e:
        raise UsageError(str(e)) from e


def encode_prompts(tokenizer, vocab_size: int, prompts: list[str]) -> list[list[int]]:
    encoded = []
    for i, p in enumerate(prompts):
        ids = list(tokenizer.encode(p))
        if not ids:
            raise UsageError(f"prompt {i + 1} encodes to no tokens")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(f"prompt {i + 1} holds token id {bad[0]}, outside the model's "
                             f"vocabulary [0, {vocab_size})")
        encoded.append(ids)
    return encoded


def run(args, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    prompts = read_prompts(args)
    _check_sampling(args)  # before reading the run
    from mamba3_jax.load import load_model, read_run

    try:
        info = read_run(args.workdir, args.step)  # config and tokenizer, no weights yet
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UsageError(str(e)) from e
    vocab = info.model_config.vocab_size
    _check_sampling(args, vocab)
    encoded = encode_prompts(info.tokenizer, vocab, prompts)
    from mamba3_jax.generate import check_cache_room

    try:  # attention layers: prompt + new tokens must fit the KV cache
        check_cache_room(info.model_config, max(map(len, encoded)), args.max_new_tokens)
    except ValueError as e:
        raise UsageError(f"{e}; use a smaller --max_new_tokens") from e

    import jax
    import jax.numpy as jnp

    from mamba3_jax.generate import stream

    try:
        loaded = load_model(info.workdir, info.step)
    except ValueError as e:  # weights that do not fit the stored config
        raise UsageError(str(e).splitlines()[0]) from e
    tok = loaded.tokenizer
    eos = None if args.ignore_eos else tok.eos_id
    mc = loaded.model.cfg
    print(f"[{info.workdir} step {info.step}: {mc.describe()}, {mc.num_params() / 1e6:.2f}M "
          f"params, tokenizer {info.config['data']['tokenizer']}]", file=err, flush=True)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, prefill_chunk=args.prefill_chunk,
                    eos_id=eos)
    key = jax.random.PRNGKey(args.seed)
    if len(prompts) == 1:  # echo the prompt, then print the continuation as it is decoded
        out.write(prompts[0])
        ids, shown = [], ""
        for t in stream(loaded.model, jnp.asarray([encoded[0]], jnp.int32), key, **sampling):
            ids.append(int(t[0]))
            text = stable_prefix(decode(tok, ids, eos))
            out.write(text[len(shown):])
            out.flush()
            shown = text
        out.write(decode(tok, ids, eos)[len(shown):] + "\n")
        return 0
    # a batch: prompts of the same token length decode together (no padding: a recurrent state
    # would absorb pad tokens); each group gets its own key folded from the seed
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    texts: list[str] = [""] * len(prompts)
    for g, (_, rows) in enumerate(sorted(by_len.items())):
        batch = jnp.asarray([encoded[i] for i in rows], jnp.int32)
        steps = list(stream(loaded.model, batch, jax.random.fold_in(key, g), **sampling))
        new = np.stack(steps, axis=1)
        for r, i in enumerate(rows):
            texts[i] = decode(tok, new[r], eos)
    for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
        out.write(f"--- {i + 1} ---\n{p}{t}\n")
    out.flush()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return run(args)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C while streaming: end the line, no traceback
        sys.stdout.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
