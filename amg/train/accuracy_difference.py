"""Is model B more accurate than model A on these queries? A paired bootstrap over the queries.

Both models answer the same queries, so the question is about their per-query differences:
resampling queries (with replacement) and recomputing the mean difference gives a 95%
percentile interval that accounts for how much the queries themselves vary. An interval
that contains 0 means the data do not say which model is better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amg.errors import InputError
from amg.statistics import RESAMPLES, excludes_zero, mean_difference_interval
from amg.train.metrics import RankMetrics


@dataclass(frozen=True)
class Difference:
    metric: str  # "rank1" or "mAP"
    a: float
    b: float
    low: float  # 95% interval of b - a
    high: float

    @property
    def delta(self) -> float:
        return self.b - self.a

    @property
    def decided(self) -> bool:
        """Whether the interval excludes 0: one model is better on this metric."""
        return excludes_zero(self.low, self.high)


def per_query(metrics: RankMetrics, metric: str) -> np.ndarray:
    if metrics.query_ap is None or metrics.query_first_rank is None:
        raise InputError("these metrics carry no per-query values (made by an older evaluation)")
    if metric == "mAP":
        return metrics.query_ap
    if metric == "rank1":
        return (metrics.query_first_rank == 1).astype(np.float64)
    raise InputError(f"unknown metric {metric!r} for a paired comparison; choose rank1 or mAP")


def paired_difference(a: RankMetrics, b: RankMetrics, metric: str, samples: int = RESAMPLES,
                      seed: int = 0) -> Difference:
    """`metric` of `a` and of `b`, and a 95% paired bootstrap interval of b - a over the queries."""
    values_a, values_b = per_query(a, metric), per_query(b, metric)
    if len(values_a) != len(values_b):
        raise InputError(f"the two evaluations have {len(values_a)} and {len(values_b)} valid queries: "
                         "a paired comparison needs the same queries")
    _, low, high = mean_difference_interval(values_a, values_b, resamples=samples, seed=seed)
    return Difference(metric, float(values_a.mean()), float(values_b.mean()), low, high)
