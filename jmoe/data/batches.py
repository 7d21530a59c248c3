"""Deterministic batches: batch number n depends only on (seed, n), so a run resumes exactly."""

from __future__ import annotations

import numpy as np


def num_windows(data: np.ndarray, seq_len: int) -> int:
    """Number of start offsets windows of seq_len + 1 tokens are drawn from (0 if `data` is too short)."""
    return max(0, data.size - seq_len - 1)


def train_batch(data: np.ndarray, seed: int, index: int, batch_size: int, seq_len: int) -> np.ndarray:
    """Batch `index`: [batch_size, seq_len + 1] int32 windows at random offsets.

    Inputs are `[:, :-1]` and next-byte targets `[:, 1:]`.
    """
    n = num_windows(data, seq_len)
    if n <= 0:
        raise ValueError(f"the training text ({data.size} bytes) is shorter than seq_len + 2 = {seq_len + 2}")
    rng = np.random.default_rng([seed, index])
    starts = rng.integers(0, n, size=batch_size)
    return np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_batches(data: np.ndarray, num_batches: int, batch_size: int, seq_len: int) -> np.ndarray:
    """A fixed validation set: [num_batches, batch_size, seq_len + 1] evenly spaced windows."""
    n = num_windows(data, seq_len)
    if n <= 0:
        raise ValueError(f"the validation text ({data.size} bytes) is shorter than seq_len + 2 = {seq_len + 2}")
    count = num_batches * batch_size
    starts = np.linspace(0, n, num=count, endpoint=False).astype(np.int64)
    windows = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    return windows.reshape(num_batches, batch_size, seq_len + 1)
