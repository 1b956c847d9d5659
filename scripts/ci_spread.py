"""How far CI's quick-profile runs move from the committed baseline, per metric.

Usage: python scripts/ci_spread.py BASELINE.csv|BASELINE_DIR RUN.csv [RUN.csv ...]

With a folder of per-CPU baselines, each run is compared with its CPU's, whatever its thread
count (the spread varies threads on purpose).

For every gated metric: the largest absolute change of an accuracy metric (0..1), any MACs
change, and the lowest ratio of a speed-up to the baseline's, over all configurations and
runs. The gate's tolerances (README, "CI and the gate") are set from this table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tabulate import tabulate

from amg.benchmark.results_file import ResultsFile, read_csv
from amg.reporting.gate import ACCURACY_METRICS, MACS_METRIC, SPEEDUP_METRIC, compare


def same_cpu_baseline(baseline: Path, run: ResultsFile) -> ResultsFile:
    if baseline.is_file():
        return read_csv(baseline)
    name = run.rows[0]["device_name"]
    for path in sorted(baseline.glob("*.csv")):
        candidate = read_csv(path)
        if candidate.rows[0]["device_name"] == name:
            return candidate
    raise SystemExit(f"{baseline} has no baseline for {name}: scripts/make-ci-baseline makes one")


def spread(baseline: Path, runs: list[Path]) -> list[list[str]]:
    rows = []
    for run in runs:
        current = read_csv(run)
        base = same_cpu_baseline(baseline, current)
        result = compare(base, current, allow_mismatch=True)  # the spread varies threads on purpose
        pairs = [(f.metric, f.baseline, f.current) for f in result.findings
                 if f.baseline is not None and f.current is not None]
        accuracy = [abs(c - b) for m, b, c in pairs if m in ACCURACY_METRICS]
        macs = [c != b for m, b, c in pairs if m == MACS_METRIC]
        speedups = [c / b for m, b, c in pairs if m == SPEEDUP_METRIC]
        machine = current.rows[0]
        rows.append([run.parent.parent.name, machine["threads"], f"{100 * max(accuracy):.2g}",
                     sum(macs), f"{min(speedups):.3f}", f"{max(speedups):.3f}",
                     "PASS" if result.passed else f"FAIL ({len(result.regressions)})"])
    return rows


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    baseline, runs = Path(argv[0]), [Path(a) for a in argv[1:]]
    headers = ["variant", "threads", "max |accuracy change| (points)", "MACs changed",
               "speed-up / baseline min", "max", "gate"]
    print(tabulate(spread(baseline, runs), headers=headers, tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
