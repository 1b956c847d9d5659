"""Latency statistics on synthetic samples: nearest-rank percentiles, ABBA interleaving and the
bootstrap interval of a paired speed-up."""

from __future__ import annotations

import numpy as np
import pytest

from amg.measure.latency import LatencyStats, paired_rounds, paired_speedup


def test_percentiles_are_nearest_rank_samples():
    stats = LatencyStats.of([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (stats.median_ms, stats.p90_ms, stats.p99_ms, stats.rounds) == (pytest.approx(50.5), 90.0, 99.0, 100)
    assert LatencyStats.of([0.003]).p99_ms == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no latency samples"):
        LatencyStats.of([])


def test_rounds_alternate_which_callable_goes_first():
    order = []
    reference, candidate = (lambda: order.append("A")), (lambda: order.append("B"))
    ref, cand = paired_rounds(reference, candidate, rounds=4, warmup=0)
    assert "".join(order) == "ABBAABBA" and len(ref) == len(cand) == 4
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        paired_rounds(reference, candidate, rounds=0)


def test_the_bootstrap_interval_holds_the_true_ratio_and_narrows_with_rounds():
    rng = np.random.default_rng(1)
    ref = list(2.0e-3 * (1 + 0.05 * rng.standard_normal(400)))
    cand = list(1.6e-3 * (1 + 0.05 * rng.standard_normal(400)))  # 1.25x faster
    ratio, low, high = paired_speedup(ref, cand)
    assert low < 1.25 < high and high - low < 0.05 and low <= ratio <= high
    _, few_low, few_high = paired_speedup(ref[:20], cand[:20])
    assert few_high - few_low > high - low
    assert paired_speedup(ref, ref) == (1.0, 1.0, 1.0)  # pairs resampled whole: identical sides give exactly 1
    with pytest.raises(ValueError, match="same number"):
        paired_speedup(ref, cand[:-1])
