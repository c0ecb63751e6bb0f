"""Adapter from the training config to `mamba3_jax.data` (sources, tokenizer, packed batches).

Each host loads its own shard of the documents (`shard_index = process_index`) and its share of
the global batch; `mesh.host_batch_to_global` assembles the global arrays.
"""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from mamba3_jax.data.pipeline import BATCH_KEYS, make_lm_dataset
from mamba3_jax.data.sources import get_source
from mamba3_jax.data.tokenizers import get_tokenizer


def source_spec(spec) -> dict:
    """A source spec as a plain dict, without None-valued options (ConfigDict placeholders)."""
    d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    return {k: v for k, v in d.items() if v is not None}


def tokenizer_from_config(config):
    return get_tokenizer(config.data.tokenizer)


def host_batch_size(global_batch: int) -> int:
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"batch {global_batch} is not divisible by {n} hosts")
    return global_batch // n


def train_dataset(config, tokenizer, source=None):
    """The training pipeline of this host (a grain IterDataset; iter() it). `source`: the
    already built train source (see preflight.load_inputs), else built from the config."""
    d = config.data
    source = source if source is not None else get_source(source_spec(d.train_source))
    return make_lm_dataset(
        source, tokenizer, seq_len=int(d.seq_len), batch_size=host_batch_size(int(d.batch_size)),
        seed=int(config.train.seed), shuffle=True, repeat=True,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        num_streams=int(d.num_streams) or None, num_threads=int(d.num_threads),
        prefetch=int(d.prefetch))


class EvalData:
    """Deterministic validation batches: the first `eval_steps` batches of one in-order pass,
    rows interleaved from up to `batch` documents (so the sample covers several documents).
    Every host yields exactly `eval_steps` batches; exhausted ones are fully masked padding."""

    def __init__(self, config, tokenizer, source=None):
        d = config.data
        self.seq_len = int(d.seq_len)
        self.batch = host_batch_size(int(d.eval_batch_size or d.batch_size))
        self.steps = int(config.train.eval_steps)
        self.tokenizer = tokenizer
        self.source = source if source is not None else get_source(source_spec(d.eval_source))
        self._cache: list[dict] | None = None

    def _load(self) -> list[dict]:
        n_docs = len(range(jax.process_index(), len(self.source), jax.process_count()))
        ds = make_lm_dataset(
            self.source, self.tokenizer, seq_len=self.seq_len, batch_size=self.batch,
            shuffle=False, repeat=False, shard_index=jax.process_index(),
            shard_count=jax.process_count(), num_streams=max(1, min(self.batch, n_docs)),
            prefetch=0)
        it = iter(ds)
        out = []
        try:
            for _ in range(self.steps):
                try:
                    out.append(next(it))
                except StopIteration:
                    break
        finally:
            it.close()
        while len(out) < self.steps:
            out.append({k: np.zeros((self.batch, self.seq_len),
                                    np.float32 if k == "loss_mask" else np.int32)
                        for k in BATCH_KEYS})
        return out

    def __iter__(self) -> Iterator[dict]:
        if self._cache is None:
            self._cache = self._load()  # small: eval_steps batches of int32
        return iter(self._cache)
