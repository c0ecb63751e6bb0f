"""State-tracking generators, checked against evaluators written independently of them.

The token tables are spelled out here as documented in docs/tasks.md; the answers are recomputed
three ways (a precedence-climbing parser, a strict parser of the bracket grammar, Python `eval`).
"""

import numpy as np
import pytest

from mamba3_jax.tasks import get_task, make_batch

PARITY_TABLE = {0: None, 1: "0", 2: "1", 3: "="}
ARITH_TABLE = {
    0: None, 1: "0", 2: "1", 3: "2", 4: "3", 5: "4",
    6: "+", 7: "-", 8: "*", 9: "(", 10: ")", 11: "=",
}  # fmt: skip
TABLES = {"parity": PARITY_TABLE, "mod_arith": ARITH_TABLE, "mod_arith_brackets": ARITH_TABLE,
          "mod_sum": ARITH_TABLE}
NUM_CLASSES = {"parity": 2, "mod_arith": 5, "mod_arith_brackets": 5, "mod_sum": 5}
FLAT = ("mod_arith", "mod_sum")  # d op d ... op d: odd lengths only
NAMES = tuple(TABLES)
DIGITS = set("01234")


# ----------------------------------------------------------------------------- evaluators
def symbols(task_name, row):
    """Token ids of one row -> list of symbols, padding dropped, trailing '=' checked and cut."""
    table = TABLES[task_name]
    syms = [table[int(t)] for t in row if table[int(t)] is not None]
    assert syms[-1] == "=", syms
    assert "=" not in syms[:-1]
    return syms[:-1]


class _Parser:
    """Recursive descent with the usual precedence: expr := term (('+'|'-') term)*,
    term := unary ('*' unary)*, unary := '-' unary | '(' expr ')' | digit. Exact integers."""

    def __init__(self, syms):
        self.s, self.i = syms, 0

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self, expected=None):
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise SyntaxError(f"expected {expected!r} at {self.i}, got {tok!r} in {self.s}")
        self.i += 1
        return tok

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self):
        value = self.unary()
        while self.peek() == "*":
            self.take()
            value *= self.unary()
        return value

    def unary(self):
        tok = self.peek()
        if tok == "-":
            self.take()
            return -self.unary()
        if tok == "(":
            self.take()
            value = self.expr()
            self.take(")")
            return value
        if tok in DIGITS:
            return int(self.take())
        raise SyntaxError(f"unexpected {tok!r} at {self.i} in {self.s}")

    def parse(self):
        value = self.expr()
        if self.i != len(self.s):
            raise SyntaxError(f"trailing tokens at {self.i} in {self.s}")
        return value


def eval_tokens(syms):
    return _Parser(syms).parse() % 5


def bracket_grammar_value(syms):
    """Strict parser of E := d | -d | (d) | (-d) | ( E op E ), op in {+, -}.

    Returns (value mod 5, leaf kinds used, ops used, splits); `splits` holds one
    (composite length, left operand length) pair per composite. Raises SyntaxError off-grammar."""
    kinds, ops, splits = [], [], []

    def digit(i):
        if i >= len(syms) or syms[i] not in DIGITS:
            raise SyntaxError(f"digit expected at {i} in {syms}")
        return int(syms[i])

    def e(i):
        tok = syms[i] if i < len(syms) else None
        if tok in DIGITS:
            kinds.append("d")
            return int(tok), i + 1
        if tok == "-":
            kinds.append("-d")
            return -digit(i + 1), i + 2
        if tok != "(":
            raise SyntaxError(f"unexpected {tok!r} at {i} in {syms}")
        if i + 2 < len(syms) and syms[i + 1] in DIGITS and syms[i + 2] == ")":
            kinds.append("(d)")
            return digit(i + 1), i + 3
        if (
            i + 3 < len(syms)
            and syms[i + 1] == "-"
            and syms[i + 2] in DIGITS
            and syms[i + 3] == ")"
        ):
            kinds.append("(-d)")
            return -digit(i + 2), i + 4
        left, j = e(i + 1)
        op = syms[j] if j < len(syms) else None
        if op not in ("+", "-"):
            raise SyntaxError(f"op expected at {j} in {syms}")
        ops.append(op)
        right, k = e(j + 1)
        if k >= len(syms) or syms[k] != ")":
            raise SyntaxError(f"')' expected at {k} in {syms}")
        splits.append((k + 1 - i, j - i - 1))
        return (left + right if op == "+" else left - right), k + 1

    value, end = e(0)
    if end != len(syms):
        raise SyntaxError(f"trailing tokens in {syms}")
    return value % 5, kinds, ops, splits


def check_flat_grammar(syms):
    """`d op d ... op d` with op in + - * and no brackets or unary minus."""
    assert len(syms) % 2 == 1, syms
    assert all(s in DIGITS for s in syms[0::2]), syms
    assert all(s in ("+", "-", "*") for s in syms[1::2]), syms


def reference_answer(task_name, syms):
    """Answer class computed without the generator; also cross-checks with Python eval."""
    if task_name == "parity":
        assert set(syms) <= {"0", "1"}, syms
        return syms.count("1") % 2
    if task_name in FLAT:
        check_flat_grammar(syms)
        assert task_name == "mod_arith" or "*" not in syms, syms  # mod_sum: + and - only
    else:
        grammar_value = bracket_grammar_value(syms)[0]
    value = eval_tokens(syms)
    assert value == eval("".join(syms)) % 5, syms  # digits/operators only
    if task_name == "mod_arith_brackets":
        assert value == grammar_value, syms
    return value


def mismatches(task_name, batch):
    """Rows whose target answer differs from the independent evaluation."""
    bad = []
    for r in range(batch["inputs"].shape[0]):
        want = reference_answer(task_name, symbols(task_name, batch["inputs"][r]))
        want_id = 1 + want  # answer class c is the token of symbol str(c), id 1 + c in both tables
        if batch["targets"][r, -1] != want_id or batch["answers"][r] != want:
            bad.append(r)
    return bad


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", NAMES)
def test_answers_match_independent_evaluator(name):
    rng = np.random.default_rng(1234)
    for lo, hi, b in [(1, 6, 400), (3, 40, 400), (3, 160, 100), (200, 256, 30)]:
        batch = make_batch(name, rng, b, lo, hi)
        assert mismatches(name, batch) == []


@pytest.mark.parametrize("name", NAMES)
def test_checker_catches_wrong_answers(name):
    """The answer check must be able to fail: corrupt some targets and expect to see them."""
    rng = np.random.default_rng(7)
    batch = make_batch(name, rng, 64, 3, 30)
    k = NUM_CLASSES[name]
    corrupt = [0, 5, 17]
    for r in corrupt:
        batch["targets"][r, -1] = 1 + (int(batch["targets"][r, -1]) - 1 + 1) % k
    assert mismatches(name, batch) == corrupt


@pytest.mark.parametrize("name", NAMES)
def test_layout_shapes_and_masks(name):
    rng = np.random.default_rng(0)
    lo, hi, b = 3, 40, 128
    batch = make_batch(name, rng, b, lo, hi)
    t = hi + 1
    for key in ("inputs", "targets", "segment_ids", "positions"):
        assert batch[key].shape == (b, t) and batch[key].dtype == np.int32, key
    assert batch["loss_mask"].shape == (b, t) and batch["loss_mask"].dtype == np.float32
    assert batch["lengths"].shape == (b,) and batch["answers"].shape == (b,)

    mask = batch["loss_mask"]
    assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask.sum(axis=1), np.ones(b))
    np.testing.assert_array_equal(mask[:, -1], np.ones(b))  # the answer is the last column
    eq_id = 3 if name == "parity" else 11
    np.testing.assert_array_equal(batch["inputs"][:, -1], np.full(b, eq_id))
    # targets: PAD everywhere but the answer column, where they hold an answer token.
    np.testing.assert_array_equal(batch["targets"][:, :-1], 0)
    answer_ids = {1, 2} if name == "parity" else {1, 2, 3, 4, 5}
    assert set(np.unique(batch["targets"][:, -1])) <= answer_ids
    assert 0 <= batch["answers"].min() and batch["answers"].max() < NUM_CLASSES[name]


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_segments_positions(name):
    rng = np.random.default_rng(3)
    batch = make_batch(name, rng, 200, 1, 30, pad_to=48)
    inputs, seg, pos = batch["inputs"], batch["segment_ids"], batch["positions"]
    assert inputs.shape == (200, 48)
    for r in range(inputs.shape[0]):
        n_real = int(batch["lengths"][r]) + 1  # expression + '='
        pad = 48 - n_real
        assert (inputs[r, :pad] == 0).all()
        assert (inputs[r, pad:] != 0).all()  # contiguous real tokens, no PAD inside
        np.testing.assert_array_equal(seg[r], np.r_[np.zeros(pad), np.ones(n_real)])
        np.testing.assert_array_equal(pos[r], np.r_[np.zeros(pad), np.arange(n_real)])
        assert len(symbols(name, inputs[r])) == batch["lengths"][r]


@pytest.mark.parametrize("name", NAMES)
def test_lengths_within_bounds_and_all_reached(name):
    rng = np.random.default_rng(11)
    lo, hi = 3, 14
    batch = make_batch(name, rng, 3000, lo, hi)
    expr_len = (batch["inputs"] != 0).sum(axis=1) - 1
    np.testing.assert_array_equal(expr_len, batch["lengths"])
    got = set(np.unique(expr_len).tolist())
    want = set(range(lo, hi + 1, 2)) if name in FLAT else set(range(lo, hi + 1))
    assert got == want
    # Uniform over the realisable lengths: each one close to its share.
    counts = np.bincount(expr_len, minlength=hi + 1)[sorted(want)]
    assert counts.min() > 0.6 * 3000 / len(want)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 6, 7, 37, 160, 256])
def test_exact_lengths_brackets_and_parity(length):
    rng = np.random.default_rng(length)
    for name in ("parity", "mod_arith_brackets"):
        batch = make_batch(name, rng, 50, length, length)
        assert batch["inputs"].shape == (50, length + 1)
        assert ((batch["inputs"] != 0).sum(axis=1) == length + 1).all(), name
        assert mismatches(name, batch) == []


def test_mod_arith_even_lengths_fall_back_to_next_lower_odd():
    rng = np.random.default_rng(5)
    for requested, realised in [(256, 255), (255, 255), (4, 3), (3, 3), (1, 1)]:
        batch = make_batch("mod_arith", rng, 20, requested, requested)
        assert batch["inputs"].shape == (20, requested + 1)  # width follows the request
        assert (batch["lengths"] == realised).all()
        assert ((batch["inputs"] != 0).sum(axis=1) == realised + 1).all()
        assert mismatches("mod_arith", batch) == []
    # Ranges holding odd lengths never produce even ones.
    batch = make_batch("mod_arith", rng, 500, 4, 9)
    assert set(np.unique(batch["lengths"]).tolist()) == {5, 7, 9}


def test_bracket_grammar_coverage():
    rng = np.random.default_rng(9)
    batch = make_batch("mod_arith_brackets", rng, 300, 3, 40)
    kinds, ops = set(), set()
    for r in range(300):
        _, k, o, _ = bracket_grammar_value(symbols("mod_arith_brackets", batch["inputs"][r]))
        kinds.update(k)
        ops.update(o)
    assert kinds == {"d", "-d", "(d)", "(-d)"}
    assert ops == {"+", "-"}
    assert not np.isin(batch["inputs"], [8]).any()  # no '*' with brackets


def test_bracket_split_is_uniform():
    """A composite of n tokens splits its n - 3 inner tokens as left in [1, n - 4] uniformly."""
    length, rows = 12, 4000
    batch = make_batch("mod_arith_brackets", np.random.default_rng(8), rows, length, length)
    root_left = []
    for r in range(rows):
        _, _, _, splits = bracket_grammar_value(symbols("mod_arith_brackets", batch["inputs"][r]))
        assert all(1 <= left <= n - 4 for n, left in splits)
        assert splits[-1][0] == length  # the root is the last composite closed
        root_left.append(splits[-1][1])
    counts = np.bincount(root_left, minlength=length - 3)[1:]
    assert counts.size == length - 4  # left in 1..8
    expected = rows / (length - 4)
    assert np.abs(counts - expected).max() < 0.2 * expected, counts


def test_flat_arith_uses_all_ops_and_no_brackets():
    batch = make_batch("mod_arith", np.random.default_rng(2), 200, 3, 40)
    assert np.isin([6, 7, 8], batch["inputs"]).all()
    assert not np.isin(batch["inputs"], [9, 10]).any()
    sums = make_batch("mod_sum", np.random.default_rng(2), 200, 3, 40)  # + and - only
    assert np.isin([6, 7], sums["inputs"]).all() and not np.isin(sums["inputs"], [8, 9, 10]).any()


def test_precedence_examples():
    """Hand-checked expressions through the reference evaluator (guards the test itself)."""
    assert eval_tokens(list("2-3*4")) == (2 - 12) % 5
    assert eval_tokens(list("4-3-2")) == (4 - 3 - 2) % 5
    assert eval_tokens(list("2*3*4+1")) == 0
    assert eval_tokens(list("(1--2)")) == 3
    assert bracket_grammar_value(list("((3--1)-2)"))[0] == 2
    with pytest.raises(SyntaxError):
        bracket_grammar_value(list("(1*2)"))
    with pytest.raises(SyntaxError):
        bracket_grammar_value(list("1+2"))  # composites must be bracketed


@pytest.mark.parametrize("name", NAMES)
def test_answer_classes_roughly_balanced(name):
    batch = make_batch(name, np.random.default_rng(4), 4000, 3, 40)
    freq = np.bincount(batch["answers"], minlength=NUM_CLASSES[name]) / 4000
    assert np.abs(freq - 1 / NUM_CLASSES[name]).max() < 0.05, freq


@pytest.mark.parametrize("name", NAMES)
def test_determinism_by_seed(name):
    a = make_batch(name, np.random.default_rng(42), 32, 3, 60)
    b = make_batch(name, np.random.default_rng(42), 32, 3, 60)
    c = make_batch(name, np.random.default_rng(43), 32, 3, 60)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], c["inputs"])


@pytest.mark.parametrize("name", NAMES)
def test_argument_validation(name):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_batch(name, rng, 4, 0, 10)
    with pytest.raises(ValueError):
        make_batch(name, rng, 4, 10, 5)
    with pytest.raises(ValueError):
        make_batch(name, rng, 4, 3, 40, pad_to=40)  # needs 41 columns
    with pytest.raises(ValueError):
        make_batch(name, rng, 0, 3, 40)
    assert make_batch(name, rng, 4, 3, 40, pad_to=41)["inputs"].shape == (4, 41)


def test_vocab_and_decode():
    for name, table in TABLES.items():
        task = get_task(name)
        assert task.vocab_size == len(table)
        assert task.pad_id == 0
        assert task.num_classes == NUM_CLASSES[name]
        for tok_id, sym in table.items():
            if sym is not None:
                assert task.tokens[tok_id] == sym
    task = get_task("mod_arith_brackets")
    batch = make_batch(task, np.random.default_rng(0), 4, 5, 9)
    for r in range(4):
        assert (
            task.decode(batch["inputs"][r]) == "".join(symbols(task.name, batch["inputs"][r])) + "="
        )


def test_restrict_to_answers():
    task = get_task("mod_arith")
    logits = np.zeros((2, 3, task.vocab_size))
    logits[..., 11] = 10.0  # '=' is not an answer: must be ignored
    logits[0, :, 1 + 3] = 1.0
    logits[1, :, 1 + 0] = 1.0
    pred = task.restrict_to_answers(logits)
    np.testing.assert_array_equal(pred, [[4, 4, 4], [1, 1, 1]])
