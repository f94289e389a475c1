"""Batching and shuffling of in-memory arrays, reproducible from a seed."""

from __future__ import annotations

from typing import Iterator

import numpy as np


def num_batches(n: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """How many batches :func:`batches` yields for ``n`` examples (the same default for
    ``drop_remainder``)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"num_batches: batch_size must be a positive integer, got "
                         f"{batch_size!r}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` examples in ``epoch``: a permutation drawn from
    ``(seed, epoch)`` alone, so any epoch can be replayed."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int | None = None,
            epoch: int = 0, drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x[i], y[i])`` batches of ``batch_size`` along the first axis.

    With a ``seed`` the order is a permutation drawn from ``(seed, epoch)``, so every epoch is
    shuffled differently and any epoch can be replayed; without one the order is kept. With
    ``drop_remainder`` the last, smaller batch is dropped (every batch has one shape, so a
    jitted step compiles once).
    """
    if len(x) != len(y):
        raise ValueError(f"batches: x and y must have the same length, got {len(x)} and {len(y)}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batches: batch_size must be a positive integer, got {batch_size!r}")
    if drop_remainder and batch_size > len(x):
        raise ValueError(f"batches: batch_size {batch_size} is larger than the data ({len(x)} "
                         f"examples) and drop_remainder is set, so there would be no batch")
    order = np.arange(len(x)) if seed is None else epoch_order(len(x), seed, epoch)
    for b in range(num_batches(len(x), batch_size, drop_remainder=drop_remainder)):
        index = order[b * batch_size:(b + 1) * batch_size]
        yield x[index], y[index]
