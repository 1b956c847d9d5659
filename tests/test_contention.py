"""Knowing when the machine was busy: other processes' CPU time during a measurement."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from amg.measure.contention import CONTENDED_SHARE, CpuWatch, contended


def test_a_busy_process_beside_the_measurement_is_seen():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        with CpuWatch() as watch:
            busy.wait(timeout=30)
    finally:
        busy.kill()
    # one core kept busy out of os.cpu_count(): at least half of that share, whatever else runs
    assert watch.other_share >= 0.5 / (os.cpu_count() or 1)
    assert 0.0 <= watch.other_share <= 1.0


@pytest.mark.parametrize("share, expected", [(None, False), (0.0, False), (CONTENDED_SHARE, False),
                                             (CONTENDED_SHARE + 0.01, True), (0.9, True)])
def test_contention_threshold(share, expected):
    assert contended(share) is expected
