"""One benchmark per (pruning configuration, backend, precision, batch): see amg.benchmark.suite."""

from __future__ import annotations

import pytest

from amg.benchmark.results import COLUMNS
from amg.errors import Unplannable
from amg.measure.backends import BackendUnavailable


def test_configuration(benchmark, suite, case):
    suite = suite.at(case)
    try:
        runner = suite.runner(case)
    except (BackendUnavailable, Unplannable) as reason:
        pytest.skip(str(reason))
    benchmark.pedantic(runner, rounds=suite.profile.rounds, warmup_rounds=2, iterations=1)
    macs, unpruned_macs = suite.macs(case.spec)
    assert macs > 0
    if case.spec.prunes:
        assert macs < unpruned_macs, "a pruned configuration must cost fewer MACs than the unpruned model"
    if benchmark.disabled:  # --benchmark-disable: nothing timed, so no row; the MACs are still checked
        return
    row = suite.measure(case, runner, benchmark.stats.stats.data)
    assert set(row) <= set(COLUMNS) and row["macs"] == macs and row["latency_median_ms"] > 0
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None and not isinstance(v, float)})
    benchmark.extra_info.update({k: round(v, 5) for k, v in row.items() if isinstance(v, float)})
