"""Wall-clock latency: warm-up, many rounds, median / p90 / p99, and paired speed-ups.

On a shared, noisy machine, two configurations timed one after the other drift apart
(measured here: an unpruned ViT-Small at batch 1 read 46 ms in one block of rounds and
45 ms in the next, while interleaved rounds showed its 50%-head-pruned twin 17% faster).
`paired_rounds` therefore alternates the two callables round by round, so drift hits
both alike, and `paired_speedup` reports the ratio of medians of that one run with its interval.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from amg.errors import InputError
from amg.statistics import percentile_interval, resampled_pairs


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    p99_ms: float
    rounds: int
    threads: int

    @classmethod
    def of(cls, samples_s: list[float]) -> LatencyStats:
        if not samples_s:
            raise InputError("no latency samples")
        ordered = sorted(samples_s)

        def quantile(q: float) -> float:  # nearest-rank: a real sample, never an interpolation
            return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1e3

        return cls(statistics.median(ordered) * 1e3, quantile(0.9), quantile(0.99), len(ordered),
                   torch.get_num_threads())


def _timed(fn: Callable[[], object], synchronize: Callable[[], None] | None) -> float:
    if synchronize:
        synchronize()
    start = time.perf_counter()
    fn()
    if synchronize:
        synchronize()  # CUDA runs asynchronously: wait for the work, not just its launch
    return time.perf_counter() - start


def paired_rounds(reference: Callable[[], object], candidate: Callable[[], object], rounds: int,
                  warmup: int = 2, synchronize: Callable[[], None] | None = None
                  ) -> tuple[list[float], list[float]]:
    """Seconds per pass of each callable, `rounds` pairs interleaved (pair i ran together)."""
    if rounds < 1:
        raise InputError("rounds must be >= 1")
    for _ in range(warmup):
        reference()
        candidate()
    ref_samples, cand_samples = [], []
    for index in range(rounds):
        # ABBA order: neither callable always runs first (caches, turbo, thermal state)
        pair = ((reference, ref_samples), (candidate, cand_samples))
        for fn, samples in (pair if index % 2 == 0 else pair[::-1]):
            samples.append(_timed(fn, synchronize))
    return ref_samples, cand_samples


class PairedSpeedup(NamedTuple):
    ratio: float  # median(reference) / median(candidate)
    low: float  # its bootstrap interval
    high: float


def paired_speedup(ref_samples: list[float], cand_samples: list[float], level: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> PairedSpeedup:
    """The speed-up of interleaved rounds (`paired_rounds`) with its bootstrap interval over the
    pairs (pairs are resampled whole, so drift shared by a pair stays shared)."""
    if len(ref_samples) != len(cand_samples) or not ref_samples:
        raise InputError("a speed-up interval needs the same number (>= 1) of reference and candidate rounds")
    ref, cand = np.asarray(ref_samples), np.asarray(cand_samples)
    picks = resampled_pairs(len(ref), resamples, seed)
    low, high = percentile_interval(np.median(ref[picks], axis=1) / np.median(cand[picks], axis=1), level)
    return PairedSpeedup(statistics.median(ref_samples) / statistics.median(cand_samples), low, high)
