"""Shared helpers of the synthetic tasks: batch layout, metrics, length curriculum.

Everything here is plain numpy (no jax import), so that data generation can run in host threads
next to a training loop without touching the accelerator.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

PAD_ID = 0

# The paper (Table 5b protocol) evaluates state tracking at expression length 256.
EVAL_LENGTH = 256

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def left_padded_layout(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`segment_ids` and `positions` of left-padded rows holding `lengths` real tokens each.

    A row of `n` real tokens occupies the last `n` columns; padding columns get segment 0 and
    position 0, real tokens segment 1 and positions 0..n-1.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    col = np.arange(seq_len, dtype=np.int64)[None, :]
    start = (seq_len - lengths)[:, None]
    real = col >= start
    segment_ids = real.astype(np.int32)
    positions = np.where(real, col - start, 0).astype(np.int32)
    return segment_ids, positions


def masked_accuracy(predictions, targets, loss_mask) -> float:
    """Fraction of masked positions where `predictions == targets` (token ids, any shape).

    For the state-tracking tasks this is the per-sequence accuracy (one masked position per row);
    for MQAR it is the accuracy over all query positions of the batch.
    """
    predictions = np.asarray(predictions)
    targets = np.asarray(targets)
    mask = np.asarray(loss_mask) > 0
    if predictions.shape != targets.shape or targets.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: predictions {predictions.shape}, targets {targets.shape}, "
            f"loss_mask {mask.shape}"
        )
    total = int(mask.sum())
    if total == 0:
        raise ValueError("loss_mask selects no position")
    return float(((predictions == targets) & mask).sum() / total)


def scaled_accuracy(acc, num_classes: int):
    """Chance-corrected accuracy `(acc - 1/K) / (1 - 1/K)` used in the paper's Table 5b.

    Chance level (acc = 1/K) maps to 0 and perfect accuracy to 1. Below-chance accuracy gives a
    negative value (it is not clipped). Accepts a scalar (returns a float) or an array.
    """
    k = int(num_classes)
    if k < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    chance = 1.0 / k
    out = (np.asarray(acc, dtype=np.float64) - chance) / (1.0 - chance)
    return float(out) if out.ndim == 0 else out


def curriculum(
    stage_lengths: Sequence[int] = (40, 80, 120, 160),
    steps_per_stage: int = 10_000,
    min_len: int = 3,
) -> Callable[[int], tuple[int, int]]:
    """Length curriculum: a function `step -> (min_len, max_len)`.

    Stage `i` covers steps `[i * steps_per_stage, (i + 1) * steps_per_stage)` and trains on lengths
    drawn uniformly from `[min_len, stage_lengths[i]]`. Steps past the last stage stay on the last
    stage. With the defaults this is the paper's schedule: 3..40, 3..80, 3..120, 3..160, 10^4
    steps each (at batch 256).
    """
    stages = tuple(int(s) for s in stage_lengths)
    if not stages:
        raise ValueError("stage_lengths must not be empty")
    if steps_per_stage < 1:
        raise ValueError(f"steps_per_stage must be >= 1, got {steps_per_stage}")
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1, got {min_len}")
    for s in stages:
        if s < min_len:
            raise ValueError(f"stage length {s} is below min_len {min_len}")
    if any(b < a for a, b in zip(stages, stages[1:], strict=False)):
        raise ValueError(f"stage_lengths must be non-decreasing, got {stages}")

    def schedule(step: int) -> tuple[int, int]:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        stage = min(step // steps_per_stage, len(stages) - 1)
        return min_len, stages[stage]

    schedule.stage_lengths = stages  # type: ignore[attr-defined]
    schedule.steps_per_stage = steps_per_stage  # type: ignore[attr-defined]
    schedule.total_steps = steps_per_stage * len(stages)  # type: ignore[attr-defined]
    return schedule


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The generator for batch `step` of a run seeded with `seed`.

    Seeding per step (rather than drawing from one long-lived generator) makes the batch stream
    resumable from any step and independent of how many batches were drawn before.
    """
    return np.random.default_rng([int(seed), int(step)])
