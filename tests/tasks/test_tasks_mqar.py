"""MQAR generator: every query is checked against the key-value bindings read off the context."""

import numpy as np
import pytest

from mamba3_jax.tasks import MQARTask, get_task, make_batch, make_mqar_batch


def check_row(inputs, targets, mask, num_kv_pairs, vocab_size, num_queries, filler):
    """Independent check of one row; returns a list of problems (empty when the row is right)."""
    problems = []
    n, half, t = num_kv_pairs, vocab_size // 2, inputs.shape[0]
    keys, values = inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2]
    if len(set(keys.tolist())) != n:
        problems.append("context keys not distinct")
    if not ((keys >= 1) & (keys < half)).all():
        problems.append("key out of range")
    if not ((values >= half) & (values < vocab_size)).all():
        problems.append("value out of range")
    binding = dict(zip(keys.tolist(), values.tolist(), strict=True))

    query_pos = np.flatnonzero(mask)
    if len(query_pos) != num_queries:
        problems.append(f"{len(query_pos)} queries, expected {num_queries}")
    if (query_pos < 2 * n).any():
        problems.append("query inside the context")
    if np.any(np.diff(query_pos) < 2):
        problems.append("overlapping query slots")
    if ((query_pos - 2 * n) % 2).any():
        problems.append("query not on a slot boundary")
    queried = inputs[query_pos].tolist()
    if len(set(queried)) != len(queried):
        problems.append("a key is queried twice")
    for p in query_pos:
        key = int(inputs[p])
        if key not in binding:
            problems.append(f"query {key} at {p} is not a context key")
            continue
        if targets[p] != binding[key]:
            problems.append(f"target {targets[p]} at {p}, bound value {binding[key]}")
        if p + 1 < t and inputs[p + 1] != binding[key]:
            problems.append(f"value after query at {p} is {inputs[p + 1]}")
    if (targets[mask == 0] != 0).any():
        problems.append("target outside the mask")

    rest = np.ones(t, dtype=bool)
    rest[: 2 * n] = False
    rest[query_pos] = False
    rest[query_pos[query_pos + 1 < t] + 1] = False
    filler_tokens = inputs[rest]
    if filler == "zeros" and (filler_tokens != 0).any():
        problems.append("non-zero filler")
    if filler == "random":
        if (filler_tokens == 0).any():
            problems.append("PAD in random filler")
        if np.isin(filler_tokens, keys).any():
            problems.append("a bound key occurs as filler")
    return problems


def check_batch(task, batch):
    return {
        r: probs
        for r in range(batch["inputs"].shape[0])
        if (
            probs := check_row(
                batch["inputs"][r],
                batch["targets"][r],
                batch["loss_mask"][r],
                task.num_kv_pairs,
                task.vocab_size,
                task.queries_per_row,
                task.filler,
            )
        )
    }


CONFIGS = [
    dict(seq_len=64, num_kv_pairs=4),
    dict(seq_len=256, num_kv_pairs=16),
    dict(seq_len=512, num_kv_pairs=64, filler="random"),
    dict(seq_len=128, num_kv_pairs=8, num_queries=3, query_placement="power_law"),
    dict(seq_len=33, num_kv_pairs=8, num_queries=8, vocab_size=40, filler="random"),  # tight
    dict(seq_len=20, num_kv_pairs=5, vocab_size=12),  # all keys and all values used
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_queries_match_context_bindings(cfg):
    task = get_task("mqar", **cfg)
    batch = task.make_batch(np.random.default_rng(0), 64)
    t = cfg["seq_len"]
    for key in ("inputs", "targets", "segment_ids", "positions"):
        assert batch[key].shape == (64, t) and batch[key].dtype == np.int32, key
    assert batch["loss_mask"].dtype == np.float32
    assert set(np.unique(batch["loss_mask"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(batch["segment_ids"], 1)
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(t), (64, 1)))
    assert check_batch(task, batch) == {}


def test_checker_catches_corruption():
    task = MQARTask(seq_len=128, num_kv_pairs=8)
    batch = task.make_batch(np.random.default_rng(1), 16)
    r, p = 3, int(np.flatnonzero(batch["loss_mask"][3])[0])
    batch["targets"][r, p] += 1
    batch["inputs"][5, 2] = batch["inputs"][5, 0]  # duplicate key in row 5's context
    batch["loss_mask"][7, 1] = 1.0  # a query inside the context
    assert sorted(check_batch(task, batch)) == [3, 5, 7]


def test_last_slot_value_only_in_targets():
    """seq_len - 2N odd: the last slot's key sits in the last column, its value is cut."""
    task = MQARTask(seq_len=11, num_kv_pairs=5, num_queries=1, vocab_size=64)
    batch = task.make_batch(np.random.default_rng(0), 8)
    np.testing.assert_array_equal(batch["loss_mask"][:, 10], 1.0)
    assert check_batch(task, batch) == {}


def test_slot_placement_uniform_and_power_law():
    rng = np.random.default_rng(2)
    uni = MQARTask(seq_len=256, num_kv_pairs=8, num_queries=1)
    pow_ = MQARTask(seq_len=256, num_kv_pairs=8, num_queries=1, query_placement="power_law")
    pos_u = np.flatnonzero(uni.make_batch(rng, 4000)["loss_mask"]) % 256
    pos_p = np.flatnonzero(pow_.make_batch(rng, 4000)["loss_mask"]) % 256
    slots_u = (pos_u - 16) // 2
    assert set(slots_u.tolist()) == set(range(uni.num_slots))  # every slot reachable
    assert abs(slots_u.mean() - (uni.num_slots - 1) / 2) < 4
    slots_p = (pos_p - 16) // 2
    assert np.median(slots_p) < 0.5 * np.median(slots_u)  # power law favours short gaps


def test_keys_and_query_order_are_random():
    batch = MQARTask(seq_len=128, num_kv_pairs=16).make_batch(np.random.default_rng(4), 64)
    keys = batch["inputs"][:, 0:32:2]
    assert not (np.diff(keys, axis=1) > 0).all(axis=1).all()  # context keys not sorted
    first_query = batch["inputs"][np.arange(64), np.argmax(batch["loss_mask"], axis=1)]
    assert (first_query != keys[:, 0]).any()  # queries not in context order
    assert len(np.unique(keys)) > 500  # keys spread over the key range


def test_determinism_and_resumable_stream():
    task = MQARTask(seq_len=64, num_kv_pairs=4)
    a = task.make_batch(np.random.default_rng(9), 8)
    b = task.make_batch(np.random.default_rng(9), 8)
    c = task.make_batch(np.random.default_rng(10), 8)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], c["inputs"])
    stream = task.batches(8, seed=3)
    first = [next(stream) for _ in range(3)]
    resumed = next(task.batches(8, seed=3, start_step=2))
    np.testing.assert_array_equal(first[2]["inputs"], resumed["inputs"])
    assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])


def test_functional_and_dispatch_forms_agree():
    kw = dict(seq_len=96, num_kv_pairs=6, vocab_size=1024)
    a = make_mqar_batch(np.random.default_rng(0), 4, **kw)
    b = make_batch("mqar", np.random.default_rng(0), 4, **kw)
    c = make_batch(MQARTask(), np.random.default_rng(0), 4, **kw)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])
    assert get_task("mqar").vocab_size == 8192
    with pytest.raises(ValueError):
        make_batch("mqar", np.random.default_rng(0), 4, 3, 40)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(seq_len=16, num_kv_pairs=8),  # no room for queries
        dict(seq_len=64, num_kv_pairs=8, vocab_size=16),  # only 7 keys
        dict(num_kv_pairs=0),
        dict(num_queries=0),
        dict(num_kv_pairs=4, num_queries=5),
        dict(filler="noise"),
        dict(query_placement="sorted"),
        dict(power_a=0.0),
    ],
)
def test_invalid_configs(cfg):
    with pytest.raises(ValueError):
        MQARTask(**cfg)


def test_accuracy_over_query_positions():
    from mamba3_jax.tasks import masked_accuracy

    batch = MQARTask(seq_len=64, num_kv_pairs=4).make_batch(np.random.default_rng(0), 8)
    perfect = batch["targets"].copy()
    assert masked_accuracy(perfect, batch["targets"], batch["loss_mask"]) == 1.0
    # Wrong everywhere outside the mask changes nothing; wrong on half the queries halves it.
    noisy = np.where(batch["loss_mask"] > 0, perfect, 1)
    assert masked_accuracy(noisy, batch["targets"], batch["loss_mask"]) == 1.0
    rows, cols = np.nonzero(batch["loss_mask"])
    noisy[rows[::2], cols[::2]] = 0
    assert masked_accuracy(noisy, batch["targets"], batch["loss_mask"]) == 0.5
