"""Converting weights between the reference implementation's conventions and ours."""

import numpy as np


def mimo_channel_permutation(d_state: int, num_angles: int) -> np.ndarray:
    """perm such that ours[..., n] = reference_mimo[..., perm[n]] on the N (state) axis.

    The reference MIMO kernels rotate pairs (i, i + N/2) for i < S; we rotate (2i, 2i + 1).
    """
    half = d_state // 2
    rotated = [c for i in range(num_angles) for c in (i, i + half)]
    rest = [n for n in range(d_state) if n not in set(rotated)]
    return np.asarray(rotated + rest, np.int64)
