"""Packing, shuffling, sharding, checkpointing and evaluation of the LM pipeline."""

import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import grain
import numpy as np
import pytest

from mamba3_jax.data.pipeline import (
    BATCH_SPEC,
    batch_shapes,
    bits_per_byte,
    document_dataset,
    eval_batches,
    make_lm_dataset,
    restore_iterator_state,
    save_iterator_state,
)
from mamba3_jax.data.sources import BooksSource, InMemorySource
from mamba3_jax.data.tokenizers import ByteTokenizer, get_tokenizer

BYTE = ByteTokenizer()
EOS = BYTE.eos_id


def corpus(n, seed=0, max_len=70):
    """Documents with a unique tag, so every document tail (all but token 0) is unique."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghij klmnopqrstuvwxyz\n"))
    docs = []
    for i in range(n):
        body = "".join(rng.choice(letters, size=int(rng.integers(0, max_len))))
        docs.append(f"<{i}>" + body + ("é" if i % 7 == 0 else ""))
    return docs


def take(ds_or_it, n):
    return list(itertools.islice(ds_or_it, n))


def check_batch(b, batch_size, seq_len, token_bytes):
    """Invariants every batch must satisfy."""
    assert set(b) == set(BATCH_SPEC)
    for key, (dtype, _) in BATCH_SPEC.items():
        assert b[key].shape == (batch_size, seq_len), key
        assert b[key].dtype == dtype, key
    seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
    nonpad = seg != 0
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert not mask[~nonpad].any(), "loss on padding"
    # Positions restart exactly where a segment starts and count up inside it.
    starts = np.ones_like(nonpad)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    np.testing.assert_array_equal((pos == 0)[nonpad], starts[nonpad])
    inside = (seg[:, 1:] == seg[:, :-1]) & nonpad[:, 1:]
    assert ((pos[:, 1:] - pos[:, :-1]) == 1)[inside].all()
    assert (pos[~nonpad] == 0).all()
    # Segment ids within a row are 1, 2, ... then padding (0).
    for row in seg:
        ids = row[row != 0]
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
        if ids.size:
            assert ids[0] == 1
            assert (row[len(ids) :] == 0).all()
    # Targets are the inputs shifted by one, and only same-document targets count.
    valid_next = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
    np.testing.assert_array_equal(mask[:, :-1] > 0, valid_next)
    assert (b["targets"][:, :-1] == b["inputs"][:, 1:])[valid_next].all()
    np.testing.assert_array_equal(b["target_bytes"], token_bytes[b["targets"]] * (mask > 0))


def stream_tails(batches, num_streams, eos=EOS):
    """Per stream: the masked targets split at EOS = each document minus its first token."""
    seqs = [[] for _ in range(num_streams)]
    for b in batches:
        for r in range(b["targets"].shape[0]):
            seqs[r % num_streams].extend(b["targets"][r][b["loss_mask"][r] > 0].tolist())
    out = []
    for seq in seqs:
        tails, cur = [], []
        for t in seq:
            if t == eos:
                tails.append(tuple(cur))
                cur = []
            else:
                cur.append(t)
        assert not cur, "a stream ended inside a document"
        out.append(tails)
    return out


def tail(text, tok=BYTE):
    return tuple(tok.encode(text)[1:])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("num_streams", [1, 3])
def test_one_epoch_covers_every_token_once_in_order(shuffle, num_streams):
    docs = corpus(40)
    src = InMemorySource(docs)
    ds = make_lm_dataset(
        src,
        BYTE,
        seq_len=16,
        batch_size=4,
        seed=3,
        shuffle=shuffle,
        repeat=False,
        num_streams=num_streams,
    )
    batches = list(ds)
    lengths = BYTE.token_byte_lengths()
    for b in batches:
        check_batch(b, 4, 16, lengths)
    per_stream = stream_tails(batches, num_streams)
    # Each stream reads documents s, s + S, ... of the (shuffled) document order.
    order = document_dataset(src, BYTE, seed=3, shuffle=shuffle, repeat=False)
    ordered_tails = [tuple(order[i][1:-1].tolist()) for i in range(len(order))]
    for s in range(num_streams):
        assert per_stream[s] == ordered_tails[s::num_streams]
    assert sorted(itertools.chain(*per_stream)) == sorted(tail(d) for d in docs)
    if not shuffle and num_streams == 1:
        assert per_stream[0] == [tail(d) for d in docs]
        # Rows are filled in order: only the last batch has padding.
        assert all((b["segment_ids"] > 0).all() for b in batches[:-1])
        assert BYTE.decode(batches[0]["inputs"][0]).startswith(docs[0][:16])
    if shuffle:
        assert [t for s in per_stream for t in s] != [tail(d) for d in docs]


def test_first_rows_hold_the_documents_in_order():
    docs = ["abcdef", "ghij", "klmnopqrstuvwxyz0123456789"]
    ds = make_lm_dataset(
        InMemorySource(docs),
        BYTE,
        seq_len=8,
        batch_size=2,
        shuffle=False,
        repeat=False,
        num_streams=1,
    )
    b = next(iter(ds))
    # Row 0 holds 9 tokens "abcdef<eos>gh": inputs are the first 8, targets the last 8.
    assert BYTE.decode(b["inputs"][0]) == "abcdefg"
    assert b["inputs"][0, 6] == EOS
    assert b["segment_ids"][0].tolist() == [1] * 7 + [2]
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    assert b["loss_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 1]
    # "ghij" continues in row 1 as a new segment, starting again at row 0's last token "h".
    assert BYTE.decode(b["inputs"][1][:3]) == "hij"
    assert b["positions"][1][:5].tolist() == [0, 1, 2, 3, 0]
    assert b["segment_ids"][1][:5].tolist() == [1, 1, 1, 1, 2]
    assert b["target_bytes"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 1]


def test_training_rows_are_full_and_start_at_position_zero():
    ds = make_lm_dataset(InMemorySource(corpus(30)), BYTE, seq_len=32, batch_size=4, seed=1)
    for b in take(ds, 40):
        check_batch(b, 4, 32, BYTE.token_byte_lengths())
        assert (b["segment_ids"] > 0).all()
        assert (b["positions"][:, 0] == 0).all()


def test_same_seed_same_batches_different_seed_different():
    src = InMemorySource(corpus(50))

    def run(seed):
        return take(make_lm_dataset(src, BYTE, seq_len=16, batch_size=4, seed=seed), 12)

    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c, strict=True))


def test_each_epoch_is_reshuffled():
    src = InMemorySource(corpus(20))
    ds = document_dataset(src, BYTE, seed=5, shuffle=True, repeat=True)
    epoch = lambda e: [ds[e * 20 + i].tobytes() for i in range(20)]  # noqa: E731
    assert sorted(epoch(0)) == sorted(epoch(1)) and epoch(0) != epoch(1)


@pytest.mark.parametrize("shard_count", [2, 3])
def test_shards_are_disjoint_and_complete(shard_count):
    docs = corpus(31)
    src = InMemorySource(docs)
    seen = []
    for k in range(shard_count):
        ds = make_lm_dataset(
            src,
            BYTE,
            seq_len=16,
            batch_size=2,
            seed=9,
            repeat=False,
            shard_index=k,
            shard_count=shard_count,
            num_streams=2,
        )
        seen.append(set(itertools.chain(*stream_tails(list(ds), 2))))
    for i, j in itertools.combinations(range(shard_count), 2):
        assert not seen[i] & seen[j]
    assert set().union(*seen) == {tail(d) for d in docs}
    assert sum(len(s) for s in seen) == len(docs)


def test_shard_arguments_are_checked():
    src = InMemorySource(corpus(3))
    with pytest.raises(ValueError, match="shard_count"):
        make_lm_dataset(src, BYTE, seq_len=8, batch_size=2, shard_count=4, shard_index=0)
    with pytest.raises(ValueError, match="shard_index"):
        make_lm_dataset(src, BYTE, seq_len=8, batch_size=2, shard_count=2, shard_index=2)


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        for k in BATCH_SPEC:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("prefetch, num_threads", [(0, 0), (3, 2)])
def test_checkpoint_restores_the_exact_next_batches(prefetch, num_threads):
    src = InMemorySource(corpus(25, max_len=120))
    make = lambda: make_lm_dataset(
        src,
        BYTE,
        seq_len=16,
        batch_size=4,
        seed=2,  # noqa: E731
        num_streams=3,
        prefetch=prefetch,
        num_threads=num_threads,
    )
    it = iter(make())
    take(it, 9)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (orbax stores JSON)
    expected = take(it, 11)
    fresh = iter(make())
    fresh.set_state(state)
    _assert_same(take(fresh, 11), expected)
    it.set_state(state)  # rewinding the original iterator works too
    _assert_same(take(it, 11), expected)
    it.close()
    fresh.close()


def test_checkpoint_file_helpers_and_config_check(tmp_path):
    src = InMemorySource(corpus(25))
    it = iter(make_lm_dataset(src, BYTE, seq_len=16, batch_size=4, seed=2))
    take(it, 4)
    save_iterator_state(it, tmp_path / "data_state.json")
    expected = take(it, 5)
    other = iter(make_lm_dataset(src, BYTE, seq_len=16, batch_size=4, seed=2))
    restore_iterator_state(other, tmp_path / "data_state.json")
    _assert_same(take(other, 5), expected)
    wrong = iter(make_lm_dataset(src, BYTE, seq_len=32, batch_size=4, seed=2))
    with pytest.raises(ValueError, match="seq_len"):
        restore_iterator_state(wrong, tmp_path / "data_state.json")


def test_checkpoint_with_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    src = InMemorySource(corpus(25))
    make = lambda: make_lm_dataset(src, BYTE, seq_len=16, batch_size=4, seed=4)  # noqa: E731
    it = iter(make())
    take(it, 6)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(6, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = take(it, 5)
        restored = iter(make())
        mngr.restore(6, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same(take(restored, 5), expected)


def test_checkpoint_with_bpe_and_books(data_dir):
    src = BooksSource("valid", data_dir, max_bytes=150_000, cache_dir=False)
    tok = get_tokenizer("gpt2")
    make = lambda: make_lm_dataset(
        src,
        tok,
        seq_len=64,
        batch_size=2,
        seed=0,  # noqa: E731
        num_threads=2,
    )
    it = iter(make())
    first = take(it, 3)
    for b in first:
        check_batch(b, 2, 64, tok.token_byte_lengths())
    state = it.get_state()
    expected = take(it, 4)
    restored = iter(make())
    restored.set_state(state)
    _assert_same(take(restored, 4), expected)
    text = tok.decode(first[0]["inputs"][0])
    assert any(text[:200] in src[i] for i in range(len(src)))


def test_eval_batches_cover_the_split_once_in_order():
    docs = corpus(23)
    src = InMemorySource(docs)
    batches = list(eval_batches(src, BYTE, seq_len=16, batch_size=3))
    for b in batches:
        check_batch(b, 3, 16, BYTE.token_byte_lengths())
    assert stream_tails(batches, 1)[0] == [tail(d) for d in docs]
    # Rows are consecutive: only the last batch may hold empty (all-masked) rows.
    empty = [(b["segment_ids"] == 0).all(axis=1) for b in batches]
    assert not any(e.any() for e in empty[:-1])
    total_tokens = sum(len(BYTE.encode(d)) + 1 for d in docs)
    rows = math.ceil((total_tokens - 1) / 16)  # consecutive rows overlap by one token
    assert len(batches) == math.ceil(rows / 3)
    assert empty[-1].sum() == len(batches) * 3 - rows
    again = list(eval_batches(src, BYTE, seq_len=16, batch_size=3, max_batches=2))
    assert len(again) == 2
    _assert_same(again, batches[:2])


@pytest.mark.parametrize("name", ["byte", "gpt2", "cl100k_base"])
def test_target_bytes_count_every_predicted_byte(name, data_dir):
    """Sum of target_bytes over one eval pass = all text bytes except each document's
    first token (never a target), whatever the tokenizer."""
    src = BooksSource("valid", data_dir, max_bytes=60_000, cache_dir=False)
    docs = [src[i] for i in range(len(src))]
    tok = get_tokenizer(name)
    lengths = tok.token_byte_lengths()
    total = sum(int(b["target_bytes"].sum()) for b in eval_batches(src, tok, 128, 4))
    first_token_bytes = sum(int(lengths[tok.encode(d)[0]]) for d in docs)
    assert total == sum(len(d.encode()) for d in docs) - first_token_bytes


def test_bits_per_byte():
    assert bits_per_byte(math.log(2) * 1000, 1000) == pytest.approx(1.0)
    assert bits_per_byte(np.float32(3.0), np.int64(4)) == pytest.approx(3.0 / (4 * math.log(2)))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_without_eos_and_with_empty_documents():
    docs = ["abc", "", "defgh", "  ", "ij"]
    src = InMemorySource(docs)
    no_eos = list(
        make_lm_dataset(
            src,
            BYTE,
            seq_len=4,
            batch_size=2,
            shuffle=False,
            repeat=False,
            add_eos=False,
            num_streams=1,
        )
    )
    for b in no_eos:
        check_batch(b, 2, 4, BYTE.token_byte_lengths())
        assert EOS not in b["inputs"]
    assert sum(b["loss_mask"].sum() for b in no_eos) == sum(max(len(d) - 1, 0) for d in docs)
    with_eos = list(
        make_lm_dataset(
            src, BYTE, seq_len=4, batch_size=2, shuffle=False, repeat=False, num_streams=1
        )
    )
    # An empty document is a lone EOS: its first token, so never a target.
    assert stream_tails(with_eos, 1)[0] == [tail(d) for d in docs if d]


def test_tokenizer_without_eos_is_rejected():
    class NoEos(ByteTokenizer):
        eos_id = None

    with pytest.raises(ValueError, match="eos"):
        make_lm_dataset(InMemorySource(["x"]), NoEos(), seq_len=4, batch_size=1)


def test_batch_shapes():
    shapes = batch_shapes(2, 8)
    assert shapes["inputs"] == ((2, 8), np.int32)
    assert shapes["loss_mask"] == ((2, 8), np.float32)


def test_open_iterator_at_exit_does_not_crash():
    """An iterator left open at interpreter exit must not abort or print tracebacks."""
    root = pathlib.Path(__file__).resolve().parents[2]
    script = (
        "from mamba3_jax.data import InMemorySource, ByteTokenizer, make_lm_dataset\n"
        "docs = InMemorySource([str(i) * 50 for i in range(20)])\n"
        "it = iter(make_lm_dataset(docs, ByteTokenizer(), seq_len=8, batch_size=4, prefetch=3,"
        " num_threads=2))\n"
        "next(it)\n"
        "closed = iter(make_lm_dataset(docs, ByteTokenizer(), seq_len=8, batch_size=4))\n"
        "next(closed)\n"
        "closed.close()\n"
        "print('done')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        # the repo first, then whatever made grain importable here (e.g. a --target install)
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(root), os.environ.get("PYTHONPATH")) if p)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "Traceback" not in proc.stderr, proc.stderr
