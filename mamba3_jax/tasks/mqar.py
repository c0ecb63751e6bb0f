"""Multi-query associative recall (MQAR), in the layout of Zoology / Based (Arora et al., 2023).

A sequence of `seq_len` tokens (no padding, every row the same length):

    k_1 v_1 k_2 v_2 ... k_N v_N | ... 0 0 k_a v_a 0 0 0 k_b v_b 0 ... |
    \\_______ context _______/   \\________ queries + filler _________/

* Keys are drawn from `[1, V/2)`, values from `[V/2, V)` (`V = vocab_size`), both without
  replacement inside a row, so keys are distinct and every key is bound to exactly one value.
  Token 0 is PAD / filler.
* `num_queries` (default: all `N`) distinct keys of the context are queried again, in random order,
  at random "slots" of the remainder. Slot `s` covers positions `2N + 2s` (the key) and
  `2N + 2s + 1` (its value, so the sequence reads like language-model text with teacher forcing).
  Slots are chosen uniformly (default) or with Zoology's power law `P(s) ~ (s + 1)^(a - 1)`
  (`query_placement="power_law"`, `power_a=0.01`), which favours short gaps.
* The remaining positions are filler: 0 (`filler="zeros"`, Zoology's default) or uniform random
  tokens of `[1, V)` that are not keys of the row (`filler="random"`, Zoology's
  `random_non_queries`; bound keys are excluded so that no unlabelled key occurrence is followed
  by a wrong value).
* The target at a query key's position is its value (the next token); `loss_mask` is 1 exactly
  at the query key positions. The generation works on `seq_len + 1` tokens and then shifts by one
  (inputs drop the last token), so a query in the last slot may have its value only in `targets`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mamba3_jax.tasks.common import PAD_ID, step_rng

FILLERS = ("zeros", "random")
PLACEMENTS = ("uniform", "power_law")


@dataclasses.dataclass(frozen=True)
class MQARTask:
    """MQAR configuration; `make_batch(rng, batch_size)` draws batches from it."""

    seq_len: int = 256
    num_kv_pairs: int = 16
    vocab_size: int = 8192
    num_queries: int | None = None  # None: query every key once
    filler: str = "zeros"
    query_placement: str = "uniform"
    power_a: float = 0.01

    name = "mqar"

    def __post_init__(self):
        v, n = self.vocab_size, self.num_kv_pairs
        if v < 4:
            raise ValueError(f"vocab_size must be >= 4, got {v}")
        if n < 1:
            raise ValueError(f"num_kv_pairs must be >= 1, got {n}")
        if n > min(self.num_keys, self.num_values):
            raise ValueError(
                f"num_kv_pairs={n} needs {n} distinct keys and values; vocab_size={v} offers "
                f"{self.num_keys} keys and {self.num_values} values"
            )
        q = self.queries_per_row
        if not 1 <= q <= n:
            raise ValueError(f"num_queries must be in [1, num_kv_pairs={n}], got {q}")
        if q > self.num_slots:
            raise ValueError(
                f"seq_len={self.seq_len} leaves {self.num_slots} query slots after the "
                f"{2 * n}-token context, fewer than num_queries={q} (need seq_len >= "
                f"{2 * n + 2 * q - 1})"
            )
        if self.filler not in FILLERS:
            raise ValueError(f"filler must be one of {FILLERS}, got {self.filler!r}")
        if self.query_placement not in PLACEMENTS:
            raise ValueError(
                f"query_placement must be one of {PLACEMENTS}, got {self.query_placement!r}"
            )
        if not self.power_a > 0:
            raise ValueError(f"power_a must be > 0, got {self.power_a}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def key_range(self) -> tuple[int, int]:
        return 1, self.vocab_size // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.vocab_size // 2, self.vocab_size

    @property
    def num_keys(self) -> int:
        lo, hi = self.key_range
        return hi - lo

    @property
    def num_values(self) -> int:
        lo, hi = self.value_range
        return hi - lo

    @property
    def num_classes(self) -> int:
        """Possible answers of one query (the value tokens); chance accuracy is 1 / this."""
        return self.num_values

    @property
    def queries_per_row(self) -> int:
        return self.num_kv_pairs if self.num_queries is None else int(self.num_queries)

    @property
    def num_slots(self) -> int:
        return max(0, (self.seq_len + 1 - 2 * self.num_kv_pairs) // 2)

    # ------------------------------------------------------------------ batches
    def make_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        """`inputs`, `targets` int32 `(B, seq_len)`, `loss_mask` float32 (1 at query keys),
        `segment_ids` (all 1) and `positions` (0..seq_len-1) int32."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        b, n, q, t = batch_size, self.num_kv_pairs, self.queries_per_row, self.seq_len
        rows = np.arange(b)[:, None]

        keys = self.key_range[0] + _distinct(rng, b, n, self.num_keys)
        values = self.value_range[0] + _distinct(rng, b, n, self.num_values)

        # Which keys are queried (distinct, random order) and in which slots.
        which = np.argsort(rng.random((b, n)), axis=1)[:, :q]
        scores = _gumbel(rng, (b, self.num_slots))
        if self.query_placement == "power_law":
            scores += (self.power_a - 1.0) * np.log(np.arange(1, self.num_slots + 1))
        slots = np.argpartition(-scores, q - 1, axis=1)[:, :q]  # top-q scores
        qpos = 2 * n + 2 * slots

        if self.filler == "zeros":
            seq = np.zeros((b, t + 1), dtype=np.int32)
        else:
            seq = self._random_filler(rng, keys, (b, t + 1))
        seq[:, 0 : 2 * n : 2] = keys
        seq[:, 1 : 2 * n : 2] = values
        seq[rows, qpos] = np.take_along_axis(keys, which, axis=1)
        seq[rows, qpos + 1] = np.take_along_axis(values, which, axis=1)

        targets = np.zeros((b, t), dtype=np.int32)
        targets[rows, qpos] = seq[rows, qpos + 1]
        loss_mask = np.zeros((b, t), dtype=np.float32)
        loss_mask[rows, qpos] = 1.0
        return {
            "inputs": np.ascontiguousarray(seq[:, :t]),
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": np.ones((b, t), dtype=np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        }

    def batches(self, batch_size: int, seed: int, start_step: int = 0):
        """Endless iterator of batches; batch `i` only depends on `(seed, i)` (resumable)."""
        step = int(start_step)
        while True:
            yield self.make_batch(step_rng(seed, step), batch_size)
            step += 1

    def _random_filler(self, rng, keys, shape):
        v = self.vocab_size
        is_key = np.zeros((shape[0], v), dtype=bool)
        is_key[np.arange(shape[0])[:, None], keys] = True
        fill = rng.integers(1, v, size=shape, dtype=np.int64)
        rows = np.broadcast_to(np.arange(shape[0])[:, None], shape)
        bad = is_key[rows, fill]
        while bad.any():  # each round re-draws the few tokens that hit a bound key
            fill[bad] = rng.integers(1, v, size=int(bad.sum()), dtype=np.int64)
            bad = is_key[rows, fill]
        return fill.astype(np.int32)


def make_mqar_batch(
    rng: np.random.Generator,
    batch_size: int,
    seq_len: int = 256,
    num_kv_pairs: int = 16,
    vocab_size: int = 8192,
    **kwargs,
) -> dict[str, np.ndarray]:
    """Functional form of `MQARTask(seq_len, num_kv_pairs, vocab_size, **kwargs).make_batch`."""
    task = MQARTask(seq_len=seq_len, num_kv_pairs=num_kv_pairs, vocab_size=vocab_size, **kwargs)
    return task.make_batch(rng, batch_size)


def _gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    """Standard Gumbel noise; top-k of `log w + Gumbel` samples k items without replacement
    with probabilities proportional to `w` (Gumbel-top-k trick)."""
    return -np.log(-np.log(rng.random(shape) + 1e-20) + 1e-20)


def _distinct(rng: np.random.Generator, rows: int, k: int, population: int) -> np.ndarray:
    """(rows, k) int64: per row, k distinct integers of `[0, population)` in random order.

    Robert Floyd's subset sampling, vectorised over rows (k draws, each O(rows)), then a per-row
    shuffle. Cost does not grow with `population` beyond one (rows, population) bool table.
    """
    taken = np.zeros((rows, population), dtype=bool)
    out = np.empty((rows, k), dtype=np.int64)
    r = np.arange(rows)
    for i, j in enumerate(range(population - k, population)):
        t = rng.integers(0, j + 1, size=rows, dtype=np.int64)
        pick = np.where(taken[r, t], j, t)
        taken[r, pick] = True
        out[:, i] = pick
    return rng.permuted(out, axis=1)
