"""Metrics, curriculum, registry and batch streams of mamba3_jax.tasks."""

import numpy as np
import pytest

from mamba3_jax.tasks import (
    EVAL_LENGTH,
    TASK_NAMES,
    MQARTask,
    StateTrackingTask,
    batch_iterator,
    curriculum,
    get_task,
    left_padded_layout,
    make_batch,
    masked_accuracy,
    scaled_accuracy,
)


@pytest.mark.parametrize("k", [2, 3, 5, 8192])
def test_scaled_accuracy_edges(k):
    assert scaled_accuracy(1.0 / k, k) == pytest.approx(0.0, abs=1e-12)
    assert scaled_accuracy(1.0, k) == pytest.approx(1.0)
    assert scaled_accuracy(0.0, k) == pytest.approx(-1.0 / (k - 1))  # below chance: negative
    assert isinstance(scaled_accuracy(0.5, k), float)


def test_scaled_accuracy_values_and_arrays():
    assert scaled_accuracy(0.6, 5) == pytest.approx(0.5)
    assert scaled_accuracy(0.75, 2) == pytest.approx(0.5)
    out = scaled_accuracy(np.array([0.2, 0.6, 1.0]), 5)
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0], atol=1e-12)
    with pytest.raises(ValueError):
        scaled_accuracy(0.5, 1)


def test_masked_accuracy():
    targets = np.array([[0, 0, 3], [0, 0, 4]])
    mask = np.array([[0, 0, 1], [0, 0, 1]], dtype=np.float32)
    assert masked_accuracy(np.array([[9, 9, 3], [9, 9, 4]]), targets, mask) == 1.0
    assert masked_accuracy(np.array([[0, 0, 3], [0, 0, 1]]), targets, mask) == 0.5
    with pytest.raises(ValueError):
        masked_accuracy(targets, targets, np.zeros_like(mask))
    with pytest.raises(ValueError):
        masked_accuracy(targets[:, :2], targets, mask)


def test_curriculum_default_schedule():
    sched = curriculum()
    assert sched(0) == (3, 40)
    assert sched(9_999) == (3, 40)
    assert sched(10_000) == (3, 80)
    assert sched(25_000) == (3, 120)
    assert sched(39_999) == (3, 160)
    assert sched(10**7) == (3, 160)  # stays on the last stage
    assert sched.total_steps == 40_000
    with pytest.raises(ValueError):
        sched(-1)


def test_curriculum_configurable_and_validated():
    sched = curriculum(stage_lengths=(10, 20), steps_per_stage=5, min_len=2)
    assert [sched(s) for s in (0, 4, 5, 9, 10)] == [(2, 10), (2, 10), (2, 20), (2, 20), (2, 20)]
    for bad in (
        dict(stage_lengths=()),
        dict(stage_lengths=(2,), min_len=3),
        dict(stage_lengths=(40, 20)),
        dict(steps_per_stage=0),
        dict(min_len=0),
    ):
        with pytest.raises(ValueError):
            curriculum(**bad)


def test_registry():
    assert TASK_NAMES == ("parity", "mod_arith", "mod_arith_brackets", "mod_sum", "mqar")
    for name in TASK_NAMES:
        task = get_task(name)
        assert task.name == name
        assert isinstance(task, MQARTask if name == "mqar" else StateTrackingTask)
    assert get_task("mqar", seq_len=64, num_kv_pairs=4).seq_len == 64
    with pytest.raises(KeyError):
        get_task("dyck")
    with pytest.raises(TypeError):
        get_task("parity", seq_len=3)
    with pytest.raises(TypeError):
        make_batch("parity", np.random.default_rng(0), 4, 3, 10, seq_len=3)
    with pytest.raises(TypeError):
        make_batch(get_task("parity"), np.random.default_rng(0), 4, 3, 10, seq_len=3)
    with pytest.raises(ValueError):
        make_batch("parity", np.random.default_rng(0), 4)  # lengths required


def test_left_padded_layout():
    seg, pos = left_padded_layout(np.array([1, 3, 4]), 4)
    np.testing.assert_array_equal(seg, [[0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(pos, [[0, 0, 0, 0], [0, 0, 1, 2], [0, 1, 2, 3]])


def test_batch_iterator_follows_curriculum_and_resumes():
    sched = curriculum(stage_lengths=(8, 16), steps_per_stage=2)
    it = batch_iterator("mod_arith_brackets", 16, seed=5, schedule=sched)
    batches = [next(it) for _ in range(4)]
    assert [b["inputs"].shape[1] for b in batches] == [9, 9, 17, 17]
    assert all(b["lengths"].max() <= 8 for b in batches[:2])
    resumed = next(batch_iterator("mod_arith_brackets", 16, seed=5, schedule=sched, start_step=3))
    np.testing.assert_array_equal(resumed["inputs"], batches[3]["inputs"])
    fixed = batch_iterator("parity", 4, seed=0, min_len=3, max_len=40, pad_to=64)
    assert next(fixed)["inputs"].shape == (4, 64)
    mq = next(batch_iterator(MQARTask(seq_len=32, num_kv_pairs=2), 4, seed=0))
    assert mq["inputs"].shape == (4, 32)


def test_eval_length_batch_shapes():
    """The paper evaluates at length 256: one batch per task at that length."""
    rng = np.random.default_rng(0)
    for name in ("parity", "mod_arith_brackets"):
        batch = make_batch(name, rng, 8, EVAL_LENGTH, EVAL_LENGTH)
        assert (batch["lengths"] == 256).all() and batch["inputs"].shape == (8, 257)
    batch = make_batch("mod_arith", rng, 8, EVAL_LENGTH, EVAL_LENGTH)
    assert (batch["lengths"] == 255).all() and batch["inputs"].shape == (8, 257)
