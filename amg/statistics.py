"""Paired bootstrap intervals (numpy only: the torch-free reports use them too).

Both uses compare two things measured on the same units: a speed-up over interleaved rounds
(pairs of an unpruned and a pruned pass) and an accuracy difference over queries (pairs of
two models' answers to one query). Resampling whole pairs keeps what a pair shares (the
machine's drift, the query's difficulty) out of the interval.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from amg.errors import InputError

RESAMPLES = 2000
LEVEL = 0.95


def resampled_pairs(count: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, count] indices of pairs drawn with replacement."""
    if count < 1:
        raise InputError("a bootstrap needs at least one pair")
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def percentile_interval(estimates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def excludes_zero(low: float, high: float) -> bool:
    """Whether an interval of a difference decides its sign (one side is better)."""
    return low > 0 or high < 0


def mean_difference_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL,
                             resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean of b - a, and its paired bootstrap interval) over pairs (a[i], b[i])."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"paired values need the same units: {len(a)} against {len(b)}")
    differences = b - a
    means = differences[resampled_pairs(len(differences), resamples, seed)].mean(axis=1)
    return (float(differences.mean()), *percentile_interval(means, level))
