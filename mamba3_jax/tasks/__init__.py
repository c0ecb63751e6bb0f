"""Synthetic tasks: state tracking (parity, modular arithmetic with/without brackets) and MQAR.

    task = get_task("mod_arith_brackets")
    batch = make_batch(task, np.random.default_rng(0), 256, min_len=3, max_len=40)
    mqar = make_batch("mqar", rng, 64, seq_len=512, num_kv_pairs=64)

All generators are plain numpy; token tables and conventions are documented in `docs/tasks.md`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Union

import numpy as np

from mamba3_jax.tasks.common import (
    EVAL_LENGTH,
    PAD_ID,
    curriculum,
    left_padded_layout,
    masked_accuracy,
    scaled_accuracy,
    step_rng,
)
from mamba3_jax.tasks.mqar import MQARTask, make_mqar_batch
from mamba3_jax.tasks.state_tracking import (
    STATE_TRACKING_TASKS,
    ModArithBracketsTask,
    ModArithTask,
    ModSumTask,
    ParityTask,
    StateTrackingTask,
)

Task = Union[StateTrackingTask, MQARTask]

TASK_NAMES = ("parity", "mod_arith", "mod_arith_brackets", "mod_sum", "mqar")


def get_task(name: str, **kwargs) -> Task:
    """The task called `name`; MQAR takes its configuration (`seq_len`, `num_kv_pairs`,
    `vocab_size`, ...) as keyword arguments, the state-tracking tasks take none."""
    if name in STATE_TRACKING_TASKS:
        if kwargs:
            raise TypeError(f"task {name!r} takes no options, got {sorted(kwargs)}")
        return STATE_TRACKING_TASKS[name]()
    if name == MQARTask.name:
        return MQARTask(**kwargs)
    raise KeyError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")


def make_batch(
    task: Union[str, Task],
    rng: np.random.Generator,
    batch_size: int,
    min_len: int | None = None,
    max_len: int | None = None,
    pad_to: int | None = None,
    **kwargs,
) -> dict[str, np.ndarray]:
    """One batch of `task` (a name or a task object) as a dict of numpy arrays.

    State tracking: `min_len`, `max_len` (expression lengths in tokens) are required, `pad_to`
    optional. MQAR: lengths come from the task configuration; `kwargs` override its fields
    (e.g. `seq_len=512, num_kv_pairs=64`), and `min_len`/`max_len`/`pad_to` must be left unset.
    """
    if isinstance(task, str):
        task = get_task(task, **kwargs)
    elif kwargs and isinstance(task, MQARTask):
        task = dataclasses.replace(task, **kwargs)
    elif kwargs:
        raise TypeError(f"unexpected arguments for {task!r}: {sorted(kwargs)}")
    if isinstance(task, MQARTask):
        if min_len is not None or max_len is not None or pad_to is not None:
            raise ValueError("MQAR has a fixed seq_len: set seq_len, not min_len/max_len/pad_to")
        return task.make_batch(rng, batch_size)
    if min_len is None or max_len is None:
        raise ValueError(f"{task.name}: min_len and max_len are required")
    return task.make_batch(rng, batch_size, min_len, max_len, pad_to=pad_to)


def batch_iterator(
    task: Union[str, Task],
    batch_size: int,
    seed: int,
    schedule: Callable[[int], tuple[int, int]] | None = None,
    min_len: int | None = None,
    max_len: int | None = None,
    pad_to: int | None = None,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless stream of batches; batch `step` only depends on `(seed, step)`, so a run resumed
    at `start_step` sees exactly the batches it would have seen.

    For state tracking the lengths come from `schedule(step)` (e.g. `curriculum()`) if given,
    else from `min_len`/`max_len`. Note that with a curriculum and no `pad_to` the batch width
    `max_len + 1` changes at every stage (one recompilation per stage).
    """
    if isinstance(task, str):
        task = get_task(task)
    step = int(start_step)
    while True:
        rng = step_rng(seed, step)
        if isinstance(task, MQARTask):
            yield task.make_batch(rng, batch_size)
        else:
            lo, hi = schedule(step) if schedule is not None else (min_len, max_len)
            yield make_batch(task, rng, batch_size, lo, hi, pad_to=pad_to)
        step += 1


__all__ = [
    "EVAL_LENGTH",
    "MQARTask",
    "ModArithBracketsTask",
    "ModArithTask",
    "ModSumTask",
    "PAD_ID",
    "ParityTask",
    "StateTrackingTask",
    "TASK_NAMES",
    "Task",
    "batch_iterator",
    "curriculum",
    "get_task",
    "left_padded_layout",
    "make_batch",
    "make_mqar_batch",
    "masked_accuracy",
    "scaled_accuracy",
    "step_rng",
]
