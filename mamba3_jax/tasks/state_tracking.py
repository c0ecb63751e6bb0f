"""State-tracking tasks of the Mamba-3 paper (Table 5b): parity and modular arithmetic.

Every sequence is `<expression> =` followed by one answer token predicted at the `=` position:

    inputs : PAD ... PAD  e_1 e_2 ... e_L  =
    targets: PAD ... PAD  PAD PAD ... PAD  <answer>
    mask   : 0   ... 0    0   0   ... 0    1

Rows are padded on the LEFT, so the answer position is always the last column (`T - 1`):
recurrent models read the whole expression before the answer without any gather, and the
"last token" readout is the same index for every row. `segment_ids` are 0 on padding and 1 on real
tokens, so a model that resets its state at segment boundaries sees no trace of the padding.

"Length" is always the number of tokens of the expression `e_1 .. e_L` (the `=` is not counted),
so a batch for lengths `[min_len, max_len]` has `T = max_len + 1` columns unless `pad_to` is given.
Generation is vectorised over the batch (see `docs/tasks.md` for the token tables).
"""

from __future__ import annotations

import numpy as np

from mamba3_jax.tasks.common import PAD_ID, left_padded_layout

MODULUS = 5

# ---------------------------------------------------------------------------- token tables
PARITY_TOKENS = ("<pad>", "0", "1", "=")
PARITY_BIT0, PARITY_BIT1, PARITY_EQ = 1, 2, 3

# One table shared by both arithmetic tasks ('*' only occurs without brackets, '(' ')' only with).
ARITH_TOKENS = ("<pad>", "0", "1", "2", "3", "4", "+", "-", "*", "(", ")", "=")
DIGIT0 = 1  # token id of digit d is DIGIT0 + d
PLUS, MINUS, TIMES, LPAREN, RPAREN, ARITH_EQ = 6, 7, 8, 9, 10, 11


class StateTrackingTask:
    """Base class: one answer token per sequence, left padding, answer in the last column."""

    name: str = ""
    tokens: tuple[str, ...] = ()
    num_classes: int = 0
    eq_id: int = 0
    # answer_token_ids[c] is the token id of answer class c.
    answer_token_ids: tuple[int, ...] = ()

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    # ---------------------------------------------------------------- lengths
    def realisable_lengths(self, min_len: int, max_len: int) -> np.ndarray:
        """Expression lengths in `[min_len, max_len]` that the task can produce exactly."""
        return np.arange(max(min_len, 1), max_len + 1)

    def nearest_realisable_length(self, max_len: int) -> int:
        """Length used when no realisable length lies in the requested range."""
        return max_len

    def draw_lengths(self, rng: np.random.Generator, batch_size: int, min_len: int, max_len: int):
        """Expression lengths, uniform over the realisable lengths in `[min_len, max_len]`.

        If that set is empty (e.g. an even fixed length for `mod_arith`), every row gets
        `nearest_realisable_length(max_len)`, the largest realisable length not above `max_len`.
        """
        _check_lengths(min_len, max_len)
        choices = self.realisable_lengths(min_len, max_len)
        if choices.size == 0:
            return np.full(batch_size, self.nearest_realisable_length(max_len), dtype=np.int64)
        if choices.size == 1:
            return np.full(batch_size, choices[0], dtype=np.int64)
        return choices[rng.integers(0, choices.size, size=batch_size)].astype(np.int64)

    # ---------------------------------------------------------------- batches
    def _fill(self, rng: np.random.Generator, lengths: np.ndarray, seq_len: int):
        """Write the expressions (right-aligned, ending at column `seq_len - 2`).

        Returns `(inputs, answers)`: int32 `(B, seq_len)` with PAD everywhere else (the caller
        writes `=`), and the answer classes `(B,)` in `0..num_classes-1`.
        """
        raise NotImplementedError

    def make_batch(
        self,
        rng: np.random.Generator,
        batch_size: int,
        min_len: int,
        max_len: int,
        pad_to: int | None = None,
    ) -> dict[str, np.ndarray]:
        """A batch of `batch_size` sequences with expression lengths in `[min_len, max_len]`.

        Returns numpy arrays: `inputs`, `targets` int32 `(B, T)`; `loss_mask` float32 `(B, T)`
        (1 only at the answer column `T - 1`); `segment_ids`, `positions` int32 `(B, T)`;
        `lengths` int32 `(B,)` expression lengths; `answers` int32 `(B,)` answer classes.
        `T = pad_to` if given, else `max_len + 1`, independent of the lengths actually drawn, so
        that the shape is static for a jitted step.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lengths = self.draw_lengths(rng, batch_size, min_len, max_len)
        needed = max(int(max_len), int(lengths.max())) + 1
        seq_len = needed if pad_to is None else int(pad_to)
        if seq_len < needed:
            raise ValueError(f"pad_to={pad_to} is shorter than max_len + 1 = {needed}")
        inputs, answers = self._fill(rng, lengths, seq_len)
        inputs[:, -1] = self.eq_id
        answer_ids = np.asarray(self.answer_token_ids, dtype=np.int32)
        targets = np.zeros_like(inputs)
        targets[:, -1] = answer_ids[answers]
        loss_mask = np.zeros(inputs.shape, dtype=np.float32)
        loss_mask[:, -1] = 1.0
        segment_ids, positions = left_padded_layout(lengths + 1, seq_len)
        return {
            "inputs": inputs,
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": segment_ids,
            "positions": positions,
            "lengths": lengths.astype(np.int32),
            "answers": answers.astype(np.int32),
        }

    # ---------------------------------------------------------------- helpers
    def decode(self, row) -> str:
        """The string form of one row of token ids, padding dropped (e.g. `'(3-4)+...='`)."""
        return "".join(self.tokens[int(t)] for t in np.asarray(row) if int(t) != PAD_ID)

    def restrict_to_answers(self, logits):
        """Argmax over the answer tokens only: maps `(..., vocab)` logits to token ids `(...)`."""
        logits = np.asarray(logits)
        ids = np.asarray(self.answer_token_ids)
        return ids[np.argmax(logits[..., ids], axis=-1)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _check_lengths(min_len: int, max_len: int) -> None:
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1, got {min_len}")
    if max_len < min_len:
        raise ValueError(f"max_len ({max_len}) must be >= min_len ({min_len})")


def _right_aligned_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """(B, width) bool: True in the last `lengths[b]` columns of row b."""
    return np.arange(width)[None, :] >= (width - lengths)[:, None]


# ============================================================================ parity
class ParityTask(StateTrackingTask):
    """Parity of a random bit string: answer 1 iff the string holds an odd number of ones.

    Length = number of bits; every length >= 1 is realisable.
    """

    name = "parity"
    tokens = PARITY_TOKENS
    num_classes = 2
    eq_id = PARITY_EQ
    answer_token_ids = (PARITY_BIT0, PARITY_BIT1)

    def _fill(self, rng, lengths, seq_len):
        width = seq_len - 1
        real = _right_aligned_mask(lengths, width)
        bits = rng.integers(0, 2, size=(lengths.size, width), dtype=np.int8) * real
        inputs = np.zeros((lengths.size, seq_len), dtype=np.int32)
        inputs[:, :width] = np.where(real, PARITY_BIT0 + bits, PAD_ID)
        answers = bits.sum(axis=1, dtype=np.int64) % 2
        return inputs, answers


# ============================================================================ mod arithmetic
class ModArithTask(StateTrackingTask):
    """`d op d op ... op d`, digits 0..4, ops + - * with * binding tighter, result mod 5.

    Length = number of expression tokens = 2 * operands - 1, so only odd lengths are realisable:
    lengths are drawn uniformly over the odd lengths in `[min_len, max_len]`, and a range holding
    none (e.g. the fixed evaluation length 256) falls back to the largest odd length below it.
    """

    name = "mod_arith"
    tokens = ARITH_TOKENS
    num_classes = MODULUS
    eq_id = ARITH_EQ
    answer_token_ids = tuple(DIGIT0 + d for d in range(MODULUS))
    operators = (PLUS, MINUS, TIMES)  # in the order of _eval_flat's codes

    def realisable_lengths(self, min_len, max_len):
        lo = max(min_len, 1)
        lo += 1 - lo % 2
        return np.arange(lo, max_len + 1, 2)

    def nearest_realisable_length(self, max_len):
        return max_len if max_len % 2 else max_len - 1

    def _fill(self, rng, lengths, seq_len):
        batch = lengths.size
        n_ops = (lengths - 1) // 2  # operators per row (operands = n_ops + 1)
        max_ops = int(n_ops.max())
        digits = rng.integers(0, MODULUS, size=(batch, max_ops + 1), dtype=np.int64)
        # 0:+ 1:- 2:* (the first len(self.operators) of them)
        ops = rng.integers(0, len(self.operators), size=(batch, max_ops), dtype=np.int64)
        # Row b uses the LAST n_ops[b] + 1 operands and the LAST n_ops[b] operators. For the
        # evaluation the unused prefix reads `0 + 0 + ... + 0 +`, which leaves the value as is.
        live_digit = _right_aligned_mask(n_ops + 1, max_ops + 1)
        live_op = _right_aligned_mask(n_ops, max_ops)
        digits = np.where(live_digit, digits, 0)
        ops = np.where(live_op, ops, 0)
        answers = _eval_flat(digits, ops)

        width = 2 * max_ops + 1
        expr = np.empty((batch, width), dtype=np.int32)
        expr[:, 0::2] = DIGIT0 + digits
        expr[:, 1::2] = np.array(self.operators, dtype=np.int32)[ops]
        expr = np.where(_right_aligned_mask(lengths, width), expr, PAD_ID)
        inputs = np.zeros((batch, seq_len), dtype=np.int32)
        inputs[:, seq_len - 1 - width : seq_len - 1] = expr
        return inputs, answers


class ModSumTask(ModArithTask):
    """`d op d op ... op d` with + and - only, mod 5: a pure counter over Z5 (a rotation by a
    multiple of 2 pi / 5 per term). Not in the paper: a diagnostic for how precisely a model's
    learned rotations count (`experiments/rotation_probe.py`)."""

    name = "mod_sum"
    operators = (PLUS, MINUS)


def _eval_flat(digits: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """Value mod 5 of `digits[:,0] ops[:,0] digits[:,1] ...` with * before + and -.

    A left-to-right scan over columns (vectorised over rows): `acc` is the sum of the finished
    additive terms, `term` the signed product being built.
    """
    acc = np.zeros(digits.shape[0], dtype=np.int64)
    term = digits[:, 0].copy()
    for k in range(ops.shape[1]):
        op, d = ops[:, k], digits[:, k + 1]
        times = op == 2
        acc = np.where(times, acc, acc + term)
        term = np.where(times, term * d, np.where(op == 0, d, -d)) % MODULUS
    return (acc + term) % MODULUS


class ModArithBracketsTask(StateTrackingTask):
    """Random bracketed expressions over + and -, digits 0..4, result mod 5.

    A token budget `n` is expanded recursively:
        n = 1: `d`      n = 2: `-d`      n = 3: `(d)`      n = 4: `(-d)`
        n >= 5: `( left op right )` with op in {+, -}, the left budget uniform in [1, n - 4] and
                the right budget `n - 3 - left`.
    Every length >= 1 is therefore realised exactly (length = number of expression tokens).
    The expansion runs breadth-first over the whole batch at once: each level scatters the tokens
    of all nodes of that level into the output and accumulates the signed digits into the answer.
    """

    name = "mod_arith_brackets"
    tokens = ARITH_TOKENS
    num_classes = MODULUS
    eq_id = ARITH_EQ
    answer_token_ids = tuple(DIGIT0 + d for d in range(MODULUS))

    # Leaf templates by budget; -1 marks the digit.
    _LEAF = np.array(
        [
            [PAD_ID, PAD_ID, PAD_ID, PAD_ID],
            [-1, PAD_ID, PAD_ID, PAD_ID],
            [MINUS, -1, PAD_ID, PAD_ID],
            [LPAREN, -1, RPAREN, PAD_ID],
            [LPAREN, MINUS, -1, RPAREN],
        ],
        dtype=np.int32,
    )
    _LEAF_SIGN = np.array([0, 1, -1, 1, -1], dtype=np.int64)

    def _fill(self, rng, lengths, seq_len):
        batch = lengths.size
        inputs = np.zeros((batch, seq_len), dtype=np.int32)
        value = np.zeros(batch, dtype=np.int64)
        # Frontier of nodes still to expand: row, first column, token budget, sign (+1/-1).
        row = np.arange(batch, dtype=np.int64)
        col = (seq_len - 1 - lengths).astype(np.int64)
        budget = lengths.astype(np.int64)
        sign = np.ones(batch, dtype=np.int64)
        while row.size:
            leaf = budget <= 4
            if leaf.any():
                lr, lc, lb, ls = row[leaf], col[leaf], budget[leaf], sign[leaf]
                d = rng.integers(0, MODULUS, size=lr.size, dtype=np.int64)
                for j in range(4):
                    sel = lb > j
                    tok = self._LEAF[lb[sel], j]
                    tok = np.where(tok < 0, DIGIT0 + d[sel], tok)
                    inputs[lr[sel], lc[sel] + j] = tok
                signed = (ls * self._LEAF_SIGN[lb] * d).astype(np.float64)
                value += np.bincount(lr, weights=signed, minlength=batch).astype(np.int64)
            comp = ~leaf
            if not comp.any():
                break
            cr, cc, cb, cs = row[comp], col[comp], budget[comp], sign[comp]
            left = 1 + (rng.random(cr.size) * (cb - 4)).astype(np.int64)  # uniform in [1, cb-4]
            left = np.minimum(left, cb - 4)  # guard against float rounding at the top end
            minus = rng.integers(0, 2, size=cr.size, dtype=np.int64).astype(bool)
            inputs[cr, cc] = LPAREN
            inputs[cr, cc + 1 + left] = np.where(minus, MINUS, PLUS)
            inputs[cr, cc + cb - 1] = RPAREN
            row = np.concatenate([cr, cr])
            col = np.concatenate([cc + 1, cc + 2 + left])
            budget = np.concatenate([left, cb - 3 - left])
            sign = np.concatenate([cs, np.where(minus, -cs, cs)])
        return inputs, value % MODULUS


# ============================================================================ registry
STATE_TRACKING_TASKS = {
    ParityTask.name: ParityTask,
    ModArithTask.name: ModArithTask,
    ModArithBracketsTask.name: ModArithBracketsTask,
    ModSumTask.name: ModSumTask,
}
