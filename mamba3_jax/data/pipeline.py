"""The language-model input pipeline: documents -> tokens -> packed numpy batches.

Flow (all numpy, built on grain)::

  source (str docs) -> MapDataset: host shard -> shuffle(seed) -> repeat -> tokenize(+EOS)
    -> PackedLMIterDataset: concat-then-split into rows of seq_len + 1 tokens,
       rows from ``num_streams`` interleaved document streams -> batch dicts
    -> ThreadPrefetchIterDataset (optional background batches)

Each batch is a dict of ``(batch_size, seq_len)`` arrays (see ``BATCH_SPEC`` and
docs/data.md). The iterator is checkpointable with ``get_state``/``set_state``;
its state is a small JSON-serializable dict (two integers per stream), so it
works with ``grain.checkpoint.CheckpointSave/CheckpointRestore`` under orbax.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import json
import math
import os
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from mamba3_jax.data.tokenizers import Tokenizer, encode_array

STATE_VERSION = 1

# key -> (dtype, meaning); every array has shape (batch_size, seq_len).
BATCH_SPEC: dict[str, tuple[type, str]] = {
    "inputs": (np.int32, "token ids fed to the model"),
    "targets": (np.int32, "next token ids (inputs shifted by one within a row)"),
    "segment_ids": (np.int32, "1, 2, ... per document piece within a row; 0 on padding"),
    "positions": (np.int32, "position within the document piece; 0 where a piece starts"),
    "loss_mask": (np.float32, "1 where the target is the next token of the same document"),
    "target_bytes": (np.int32, "UTF-8 bytes of the target token; 0 where loss_mask is 0"),
}
BATCH_KEYS = tuple(BATCH_SPEC)


def batch_shapes(batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, int], type]]:
    """``{key: (shape, dtype)}`` of one batch, e.g. to build dummy inputs for ``jit``."""
    return {k: ((batch_size, seq_len), dtype) for k, (dtype, _) in BATCH_SPEC.items()}


def host_shard() -> tuple[int, int]:
    """``(jax.process_index(), jax.process_count())``: the per-host shard to pass in."""
    import jax

    return jax.process_index(), jax.process_count()


def bits_per_byte(sum_nll_nats: float, sum_target_bytes: float) -> float:
    """Tokenizer-independent loss: total NLL (nats, over loss_mask) / (ln 2 * bytes).

    ``sum_target_bytes`` is ``batch["target_bytes"].sum()`` over the same batches.
    """
    nbytes = float(sum_target_bytes)
    if nbytes <= 0:
        raise ValueError(f"sum_target_bytes must be positive, got {sum_target_bytes}")
    return float(sum_nll_nats) / (math.log(2.0) * nbytes)


# ------------------------------------------------------------------- documents


class TokenizeDocument:
    """Picklable map from a document string to int32 token ids (+ EOS)."""

    def __init__(self, tokenizer: Tokenizer, add_eos: bool = True):
        if add_eos and tokenizer.eos_id is None:
            raise ValueError(f"add_eos=True but {tokenizer!r} has no eos_id")
        self.tokenizer = tokenizer
        self.add_eos = add_eos

    def __call__(self, text: str) -> np.ndarray:
        ids = encode_array(self.tokenizer, text)
        if self.add_eos:
            ids = np.append(ids, np.int32(self.tokenizer.eos_id))
        return ids.astype(np.int32, copy=False)


def _check_shard(shard_index: int, shard_count: int, num_docs: int) -> None:
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"Need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if num_docs < shard_count:
        raise ValueError(
            f"The source has {num_docs} documents, fewer than shard_count={shard_count}: "
            "some hosts would get no data. Use a source with more (smaller) documents."
        )


def document_dataset(
    source,
    tokenizer: Tokenizer,
    *,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    add_eos: bool = True,
) -> grain.MapDataset:
    """Tokenized documents of one host as a grain ``MapDataset``.

    Host ``k`` of ``n`` keeps documents ``k, k + n, k + 2n, ...`` (disjoint across
    hosts), then shuffles them with ``seed``; with ``repeat`` every epoch gets a
    different shuffle (grain reseeds per epoch) and the length is infinite.
    """
    _check_shard(shard_index, shard_count, len(source))
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    return ds.map(TokenizeDocument(tokenizer, add_eos))


# --------------------------------------------------------------------- packing


def rows_to_batch(
    tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, token_bytes: np.ndarray
) -> dict[str, np.ndarray]:
    """Packed rows of ``seq_len + 1`` tokens -> the model batch (pure function).

    A target counts (loss_mask 1) only when it belongs to the same document piece
    as its input, so the model never predicts across a document boundary or into
    padding (segment 0).
    """
    seg_in, seg_next = segment_ids[:, :-1], segment_ids[:, 1:]
    valid = (seg_in != 0) & (seg_in == seg_next)
    targets = tokens[:, 1:]
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(targets),
        "segment_ids": np.ascontiguousarray(seg_in),
        "positions": np.ascontiguousarray(positions[:, :-1]),
        "loss_mask": valid.astype(np.float32),
        "target_bytes": np.where(valid, token_bytes[targets], 0).astype(np.int32),
    }


class _DocStream:
    """Cuts the documents ``first, first + stride, ...`` of ``docs`` into rows.

    State is ``(doc, offset)``: the stream's next document (counted within the
    stream) and the token offset in it where the next row starts. A document
    that does not fit in a row continues in the stream's next row, whose first
    token is the last token of the previous row (so no target is skipped); that
    piece is a new segment with positions restarting at 0.
    """

    def __init__(self, docs: grain.MapDataset, first: int, stride: int, row_len: int, pool):
        self._docs = docs
        self._num_docs = len(docs)
        self._first = first
        self._stride = stride
        self._row_len = row_len
        self._pool = pool
        self._arange = np.arange(row_len, dtype=np.int32)
        self.set_position(0, 0)

    def set_position(self, doc: int, offset: int) -> None:
        self.doc, self.offset = int(doc), int(offset)
        self._tokens: np.ndarray | None = None
        self._tokens_doc = -1
        self._pending: dict[int, concurrent.futures.Future] = {}

    def _index(self, doc: int) -> int:
        return self._first + doc * self._stride

    def _has(self, doc: int) -> bool:
        return self._index(doc) < self._num_docs

    def _load(self, doc: int) -> np.ndarray:
        future = self._pending.pop(doc, None)
        tokens = future.result() if future is not None else self._docs[self._index(doc)]
        if self._pool is not None and self._has(doc + 1) and doc + 1 not in self._pending:
            # Tokenize the stream's next document in the background.
            self._pending = {
                doc + 1: self._pool.submit(self._docs.__getitem__, self._index(doc + 1))
            }
        return tokens

    def _current(self) -> np.ndarray:
        if self._tokens_doc != self.doc:
            self._tokens = self._load(self.doc)
            self._tokens_doc = self.doc
        return self._tokens

    def fill_row(self, tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> bool:
        """Writes the next row into the given (row_len,) arrays; False if exhausted."""
        filled, segment = 0, 0
        while filled < self._row_len and self._has(self.doc):
            doc = self._current()
            rest = len(doc) - self.offset
            if rest <= 0:  # empty document
                self.doc, self.offset = self.doc + 1, 0
                continue
            take = min(rest, self._row_len - filled)
            segment += 1
            end = filled + take
            tokens[filled:end] = doc[self.offset : self.offset + take]
            segment_ids[filled:end] = segment
            positions[filled:end] = self._arange[:take]
            filled = end
            if take == rest:
                self.doc, self.offset = self.doc + 1, 0
            else:  # row is full; the next row restarts at this row's last token
                self.offset += take - 1
        return filled > 0


class PackedLMIterDataset(grain.IterDataset):
    """Packs tokenized documents into LM batches (see ``make_lm_dataset``).

    Batch row ``r`` is taken from stream ``r % num_streams``; stream ``s`` reads
    documents ``s, s + num_streams, ...`` of ``docs``. With one stream a batch is
    ``batch_size`` consecutive rows of the concatenated documents; with more
    streams a batch mixes documents (important when documents are whole books).
    When ``docs`` is finite, exhausted rows are padding (segment 0, loss_mask 0)
    and iteration stops once every stream is exhausted.
    """

    def __init__(
        self,
        docs: grain.MapDataset,
        *,
        seq_len: int,
        batch_size: int,
        num_streams: int,
        token_bytes: np.ndarray,
        num_threads: int = 0,
        config: dict[str, Any] | None = None,
    ):
        super().__init__(docs)
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 1 <= num_streams <= batch_size:
            raise ValueError(f"Need 1 <= num_streams <= batch_size, got {num_streams}")
        self.docs = docs
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_streams = num_streams
        self.token_bytes = np.asarray(token_bytes, dtype=np.int32)
        self.num_threads = num_threads
        self.config = dict(config or {})
        self.config.update(seq_len=seq_len, batch_size=batch_size, num_streams=num_streams)

    def __iter__(self) -> PackedLMIterator:
        return PackedLMIterator(self)

    def __str__(self) -> str:
        return (
            f"PackedLMIterDataset(seq_len={self.seq_len}, batch_size={self.batch_size}, "
            f"num_streams={self.num_streams})"
        )


class PackedLMIterator(grain.DatasetIterator):
    """Iterator of ``PackedLMIterDataset``; state = per-stream ``[doc, offset]``."""

    def __init__(self, ds: PackedLMIterDataset):
        super().__init__()
        self._ds = ds
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(ds.num_threads, thread_name_prefix="tokenize")
            if ds.num_threads > 0
            else None
        )
        row_len = ds.seq_len + 1
        self._streams = [
            _DocStream(ds.docs, s, ds.num_streams, row_len, self._pool)
            for s in range(ds.num_streams)
        ]

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        shape = (self._ds.batch_size, self._ds.seq_len + 1)
        tokens = np.zeros(shape, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        positions = np.zeros(shape, np.int32)
        any_row = False
        for r in range(shape[0]):
            stream = self._streams[r % len(self._streams)]
            any_row |= stream.fill_row(tokens[r], segment_ids[r], positions[r])
        if not any_row:
            raise StopIteration
        return rows_to_batch(tokens, segment_ids, positions, self._ds.token_bytes)

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": dict(self._ds.config),
            "streams": [[s.doc, s.offset] for s in self._streams],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Unsupported data iterator state version {state.get('version')}")
        saved, current = state.get("config", {}), self._ds.config
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                "The data iterator state was saved with a different pipeline config "
                f"(key: (saved, current)): {diff}"
            )
        streams = state["streams"]
        if len(streams) != len(self._streams):
            raise ValueError(f"State has {len(streams)} streams, expected {len(self._streams)}")
        for stream, (doc, offset) in zip(self._streams, streams, strict=True):
            stream.set_position(doc, offset)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        super().close()

    def __str__(self) -> str:
        return f"PackedLMIterator({self._ds})"


_LIVE_PREFETCH_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_prefetch_iterators() -> None:
    # Stop background threads before interpreter teardown: a daemon thread killed
    # inside a C++ extension call (grain's index_shuffle) aborts the process.
    for it in list(_LIVE_PREFETCH_ITERATORS):
        it.close()


class _PrefetchIterator(grain.experimental.ThreadPrefetchDatasetIterator):
    """grain's thread prefetch, made safe to leave open at exit.

    grain 0.2.18's ``close`` fails when called again from ``__del__`` and at
    interpreter exit; an iterator left open at exit could even abort the process
    (its daemon thread dies inside C++). Open iterators are closed by ``atexit``.
    """

    def __init__(self, parent, prefetch_buffer_size):
        super().__init__(parent, prefetch_buffer_size)
        _LIVE_PREFETCH_ITERATORS.add(self)

    def close(self, _is_finalizing=sys.is_finalizing) -> None:
        if self._closed:
            return
        try:
            super().close()
        except (AttributeError, TypeError):
            if not _is_finalizing():
                raise


class _PrefetchIterDataset(grain.experimental.ThreadPrefetchIterDataset):
    def __iter__(self) -> _PrefetchIterator:
        return _PrefetchIterator(self._parent.__iter__(), self._prefetch_buffer_size)


# ------------------------------------------------------------------ public API


def make_lm_dataset(
    source,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    add_eos: bool = True,
    num_streams: int | None = None,
    num_threads: int = 0,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Builds the LM training/eval pipeline; ``iter()`` of it yields numpy batch dicts.

    Args:
      source: random-access documents (``len``, ``[i] -> str``).
      tokenizer: see ``mamba3_jax.data.tokenizers``.
      seq_len, batch_size: each batch has ``(batch_size, seq_len)`` arrays.
      seed: document shuffle seed (0 <= seed < 2**32).
      shuffle, repeat: shuffle documents; loop forever over epochs (training).
      shard_index, shard_count: this host's shard of the documents; pass
        ``host_shard()`` (jax process index/count) from the call site.
      add_eos: append EOS after every document.
      num_streams: rows of a batch come from this many interleaved document
        streams. Default: ``min(batch_size, documents in the shard)`` when
        ``repeat`` (mixed batches), else 1 (rows in document order).
      num_threads: threads that tokenize each stream's next document ahead of
        time (worth it for BPE tokenizers on long documents).
      prefetch: batches produced ahead in a background thread (0: none; batches
        are then built synchronously in ``next``).
    """
    docs = document_dataset(
        source,
        tokenizer,
        seed=seed,
        shuffle=shuffle,
        repeat=repeat,
        shard_index=shard_index,
        shard_count=shard_count,
        add_eos=add_eos,
    )
    docs_in_shard = len(range(shard_index, len(source), shard_count))
    if num_streams is None:
        num_streams = min(batch_size, docs_in_shard) if repeat else 1
    config = {
        "seed": int(seed) if shuffle else None,
        "shuffle": bool(shuffle),
        "repeat": bool(repeat),
        "shard_index": int(shard_index),
        "shard_count": int(shard_count),
        "add_eos": bool(add_eos),
        "num_docs": int(len(source)),
        "vocab_size": int(tokenizer.vocab_size),
    }
    ds: grain.IterDataset = PackedLMIterDataset(
        docs,
        seq_len=seq_len,
        batch_size=batch_size,
        num_streams=num_streams,
        token_bytes=tokenizer.token_byte_lengths(),
        num_threads=num_threads,
        config=config,
    )
    if prefetch > 0:
        ds = _PrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def eval_batches(
    source,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    add_eos: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic evaluation batches: one pass over (this host's shard of) the
    split, documents in order, rows filled in order; the last batch is padded
    with fully masked rows. Stops after ``max_batches`` if given.
    """
    ds = make_lm_dataset(
        source,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        shuffle=False,
        repeat=False,
        shard_index=shard_index,
        shard_count=shard_count,
        add_eos=add_eos,
        num_streams=1,
        prefetch=0,
    )
    it = iter(ds)
    try:
        yield from itertools.islice(it, max_batches)
    finally:
        it.close()


# ----------------------------------------------------------------- checkpoints


def save_iterator_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Writes ``iterator.get_state()`` as JSON (for use without orbax).

    With orbax, save the iterator next to the model instead::

      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(train_state),
          data=grain.checkpoint.CheckpointSave(iterator)))
      mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(iterator)))
    """
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(iterator.get_state(), f, indent=1)
    os.replace(tmp, path)


def restore_iterator_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Sets ``iterator`` to the state saved by ``save_iterator_state``."""
    with open(path, encoding="utf-8") as f:
        iterator.set_state(json.load(f))
