"""Was the machine busy while we timed? The CPU time other processes took during a measurement.

A load average lags by a minute and counts our own threads; this counts, over exactly the
measured interval, the machine's busy CPU time minus this process's own (its threads, ONNX
Runtime's included), as a share of the machine's capacity (wall time x cores).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import psutil

# Above this share of the machine's CPU taken by other processes, a timing is flagged: on
# 2 cores one busy process beside the run takes ~50%, slowing torch up to 7x.
CONTENDED_SHARE = 0.10


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _own_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


@dataclass
class CpuWatch:
    """`with CpuWatch() as watch: ...`, then `watch.other_share`: others' CPU over that interval."""

    other_share: float | None = None
    _start: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), repr=False)

    def __enter__(self) -> CpuWatch:
        self._start = (time.perf_counter(), _busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start[0]
        others = (_busy_seconds() - self._start[1]) - (_own_seconds() - self._start[2])
        capacity = wall * (os.cpu_count() or 1)
        self.other_share = round(min(max(others / capacity, 0.0), 1.0), 4) if capacity > 0 else None


def contended(share: float | None) -> bool:
    return share is not None and share > CONTENDED_SHARE
