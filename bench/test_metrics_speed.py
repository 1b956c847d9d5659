"""Speed of evaluate_rank on a Market-1501-sized problem (3,368 queries x 15,913 gallery)."""

from __future__ import annotations

import numpy as np
import pytest

from amg.train.metrics import evaluate_rank

NUM_QUERY, NUM_GALLERY = 3368, 15913
NUM_IDS, NUM_CAMS = 751, 6
MEDIAN_BUDGET_S = 2.0


@pytest.fixture(scope="module")
def market_sized_problem() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1501)
    distmat = rng.random((NUM_QUERY, NUM_GALLERY), dtype=np.float32)
    q_pids = rng.integers(1, NUM_IDS + 1, NUM_QUERY)
    g_pids = rng.integers(1, NUM_IDS + 1, NUM_GALLERY)
    # Market's gallery also holds distractors (pid 0) and junk (pid -1); keep both code paths in the timing.
    g_pids[rng.random(NUM_GALLERY) < 0.15] = 0
    g_pids[rng.random(NUM_GALLERY) < 0.05] = -1
    q_camids = rng.integers(0, NUM_CAMS, NUM_QUERY)
    g_camids = rng.integers(0, NUM_CAMS, NUM_GALLERY)
    return distmat, q_pids, g_pids, q_camids, g_camids


def test_evaluate_rank_market_size(benchmark, market_sized_problem):
    benchmark.extra_info["queries"] = NUM_QUERY
    benchmark.extra_info["gallery"] = NUM_GALLERY
    result = benchmark.pedantic(
        evaluate_rank, args=market_sized_problem, kwargs={"max_rank": 10}, rounds=3, warmup_rounds=1, iterations=1
    )
    assert result.num_queries + result.num_skipped == NUM_QUERY
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        assert median <= MEDIAN_BUDGET_S, f"median {median:.3f}s exceeds {MEDIAN_BUDGET_S}s"
