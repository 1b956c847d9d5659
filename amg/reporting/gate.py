"""`amg gate`: compare a benchmark run with a committed baseline, and fail on regressions.

Rows are matched by `amg.benchmark.results.KEY_COLUMNS` (batch as an integer). Checked, per baseline
configuration:

- accuracy (query/occluded Rank-1, mAP, and Rank-5 / mINP when the baseline has them): a drop
  of more than `Tolerances.accuracy_drop` (absolute, on 0..1 metrics) fails;
- `macs` (exact multiply-adds per image): any relative change beyond `Tolerances.macs_change`
  fails, increases included (by default any change at all: a changed count means changed code);
- `speedup` (unpruned median / this median, measured interleaved in the same run): when both
  rows carry its 95% bootstrap interval, it fails when the run's interval lies wholly below
  the baseline's and it lost more than `Tolerances.speedup_min_drop`; otherwise a drop of more
  than `Tolerances.speedup_drop` (relative) fails. Absolute latencies are never compared
  across runs: they depend on the machine and its load.

Runs that cannot be compared are refused (exit 2) unless `allow_mismatch`: another
`device_id`, another thread count or input size, or no backend in common; with it, the
differences are printed above the verdict.

It fails closed: a baseline configuration absent from the run, or a metric the baseline has
but the run lacks (empty, NaN or not a number), is "missing" and fails. Metrics empty in the
baseline are not checked; configurations only in the run are reported as notes.

Exit codes of `main`: 0 pass, 1 regression or missing, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tabulate import tabulate

from amg.benchmark.results import INTERRUPTED, KEY_COLUMNS, ReportError, ResultsFile, read_csv
from amg.errors import InputError
from amg.measure.contention import contended

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

ACCURACY_METRICS = (
    "query_rank1",
    "query_mAP",
    "occluded_rank1",
    "occluded_mAP",
    "query_rank5",
    "query_mINP",
    "occluded_rank5",
    "occluded_mINP",
)
MACS_METRIC = "macs"
SPEEDUP_METRIC = "speedup"
CHECKED_METRICS = ACCURACY_METRICS + (MACS_METRIC, SPEEDUP_METRIC)

# Pseudo-metrics for findings about whole rows rather than one value.
CONFIGURATION = "(configuration)"
BASELINE = "(baseline)"

OK, REGRESSION, MISSING = "ok", "regression", "missing"

_EPSILON = 1e-12  # float slack, so that a change of exactly the tolerance passes


@dataclass(frozen=True)
class Tolerances:
    accuracy_drop: float = 0.01  # absolute on 0..1 metrics: fail if current < baseline - tol
    macs_change: float = 0.0  # relative, either direction: fail if |current - baseline| > tol * baseline
    speedup_drop: float = 0.10  # relative: fail if current < baseline * (1 - tol) (rows without intervals)
    # With 95% intervals on both sides: fail when the current interval lies wholly below the
    # baseline's and the drop exceeds this floor: reruns of unchanged code drifted by up to 3%
    # here (results/baselines/gate-reruns), more than their within-run intervals show.
    speedup_min_drop: float = 0.05

    def __post_init__(self) -> None:
        for name in ("accuracy_drop", "macs_change", "speedup_drop", "speedup_min_drop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"tolerance {name} must be a finite number >= 0, got {value!r}")
        if self.speedup_drop >= 1:
            raise InputError(f"tolerance speedup_drop must be below 1, got {self.speedup_drop!r}")


@dataclass(frozen=True)
class Finding:
    key: tuple  # (config_id, backend, precision, batch); () for findings about a whole file
    metric: str  # a column name, or CONFIGURATION / BASELINE
    baseline: float | None
    current: float | None
    verdict: str  # "ok" | "regression" | "missing"
    note: str = ""


@dataclass(frozen=True)
class GateResult:
    findings: list[Finding] = field(default_factory=list)
    configurations: int = 0  # baseline configurations found in the current run and compared
    # What made each side (CPU or GPU, threads), e.g. "AMD EPYC, 2 threads"; told when they differ
    baseline_machine: str = ""
    current_machine: str = ""
    mismatches: list[str] = field(default_factory=list)  # compared anyway (allow_mismatch)

    @property
    def passed(self) -> bool:
        return all(f.verdict == OK for f in self.findings)

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == REGRESSION]

    @property
    def missing(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == MISSING]

    @property
    def metrics_checked(self) -> int:
        return sum(1 for f in self.findings if f.metric in CHECKED_METRICS)


def parse_number(value: Any) -> float | None:
    """A finite float, or None for empty / None / NaN / infinite / not a number."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            return None
    return number if math.isfinite(number) else None


def machine(rows: Sequence[Mapping[str, Any]]) -> str:
    """The CPU or GPU (`device_name`) and thread counts that made `rows`, e.g. "AMD EPYC, 2 threads"."""
    seen = dict.fromkeys(f"{row.get('device_name') or 'unknown device'}, {row.get('threads') or '?'} threads"
                         for row in rows)
    return " + ".join(seen)


# What must be equal for two runs to be compared: a speed-up measured with other threads, at
# another input size or on another device is another experiment, not a regression.
COMPARABLE_COLUMNS = ("device_id", "threads", "input_size")


class RunMismatch(ReportError):
    """The baseline and the run were made under different conditions (device, threads, input, backends)."""


def mismatches(baseline_rows: Sequence[Mapping[str, Any]], current_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """How the two runs' conditions differ, one line each (blank values, e.g. older CSVs, are not compared)."""
    found = []
    for column in COMPARABLE_COLUMNS:
        base = {str(row[column]).strip() for row in baseline_rows if not _is_blank(row.get(column))}
        cur = {str(row[column]).strip() for row in current_rows if not _is_blank(row.get(column))}
        if base and cur and base != cur:
            found.append(f"{column}: baseline {', '.join(sorted(base))}; current {', '.join(sorted(cur))}")
    base_backends = {row.get("backend") for row in baseline_rows}
    cur_backends = {row.get("backend") for row in current_rows}
    if current_rows and not base_backends & cur_backends:
        found.append(f"backend: no backend in common (baseline {', '.join(sorted(map(str, base_backends)))}; "
                     f"current {', '.join(sorted(map(str, cur_backends)))})")
    return found


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _row_key(row: Mapping[str, Any], source: str, index: int) -> tuple:
    values = []
    for column in KEY_COLUMNS:
        value = row.get(column)
        if _is_blank(value):
            raise ReportError(f"{source} row {index}: empty key column {column!r}")
        values.append(str(value).strip())
    batch = parse_number(values[-1])
    if batch is None or batch != int(batch):
        raise ReportError(f"{source} row {index}: batch {values[-1]!r} is not an integer")
    return (*values[:-1], int(batch))


def _index(rows: Iterable[Mapping[str, Any]], source: str) -> tuple[dict[tuple, Mapping[str, Any]], dict[tuple, int]]:
    """Rows by key (the last row wins) and how many rows each key had."""
    by_key: dict[tuple, Mapping[str, Any]] = {}
    counts: dict[tuple, int] = {}
    for index, row in enumerate(rows, start=1):
        key = _row_key(row, source, index)
        by_key[key] = row
        counts[key] = counts.get(key, 0) + 1
    return by_key, counts


def _rows_and_name(rows: ResultsFile | Iterable[Mapping[str, Any]], default: str) -> tuple[list, str]:
    if isinstance(rows, ResultsFile):
        return list(rows.rows), str(rows.path)
    return list(rows), default


def _intervals(row: Mapping[str, Any]) -> tuple[float, float] | None:
    low, high = parse_number(row.get("speedup_ci_low")), parse_number(row.get("speedup_ci_high"))
    return (low, high) if low is not None and high is not None else None


def _check_speedup_intervals(base: float, cur: float, base_ci: tuple[float, float], cur_ci: tuple[float, float],
                             tol: Tolerances) -> tuple[str, str]:
    """On evidence: the run's 95% interval wholly below the baseline's, and more than the floor lost."""
    if cur_ci[1] < base_ci[0] and cur < base * (1 - tol.speedup_min_drop) - _EPSILON:
        return REGRESSION, (f"speed-up fell to {cur / base:.1%} of baseline: interval [{cur_ci[0]:.3f}, "
                            f"{cur_ci[1]:.3f}] below [{base_ci[0]:.3f}, {base_ci[1]:.3f}]")
    return OK, ""


def _check(metric: str, base: float, cur: float, tol: Tolerances) -> tuple[str, str]:
    """(verdict, note) for one metric present in both runs."""
    if metric in ACCURACY_METRICS:
        if cur < base - tol.accuracy_drop - _EPSILON:
            return REGRESSION, f"dropped {base - cur:.4f}, tolerance {tol.accuracy_drop:g}"
        return OK, ""
    if metric == MACS_METRIC:
        if abs(cur - base) > tol.macs_change * abs(base) + _EPSILON * max(1.0, abs(base)):
            direction = "increased" if cur > base else "decreased"
            return REGRESSION, f"{direction}: MACs must not change (tolerance {tol.macs_change:g} relative)"
        return OK, ""
    if metric == SPEEDUP_METRIC:
        if cur < base * (1 - tol.speedup_drop) - _EPSILON:
            return REGRESSION, f"speed-up fell to {cur / base:.1%} of baseline, tolerance {tol.speedup_drop:g}"
        return OK, ""
    raise InputError(f"no rule for metric {metric!r}")


def compare(
    baseline_rows: ResultsFile | Iterable[Mapping[str, Any]],
    current_rows: ResultsFile | Iterable[Mapping[str, Any]],
    tolerances: Tolerances = Tolerances(),
    allow_mismatch: bool = False,
) -> GateResult:
    """Compare rows of a run with rows of a baseline (CSV rows as dicts, or `ResultsFile`s).

    Raises `ReportError` for a row whose key columns are empty or whose batch is not an integer,
    and `RunMismatch` for runs made under other conditions (`mismatches`) unless `allow_mismatch`.
    """
    baseline_list, baseline_name = _rows_and_name(baseline_rows, "baseline")
    current_list, current_name = _rows_and_name(current_rows, "current")
    findings: list[Finding] = []
    if not baseline_list:
        findings.append(Finding((), BASELINE, None, None, MISSING, f"{baseline_name} has no rows: nothing to compare"))
        return GateResult(findings)
    if any(row.get("run_status") == INTERRUPTED for row in baseline_list):
        raise ReportError(f"{baseline_name} is an interrupted run: it cannot be a baseline (measure it again)")
    differences = mismatches(baseline_list, current_list)
    if differences and not allow_mismatch:
        raise RunMismatch(f"{current_name} was not made under the conditions of {baseline_name}: "
                          + "; ".join(differences) + " (--allow-mismatch compares them anyway)")
    baseline, baseline_counts = _index(baseline_list, baseline_name)
    current, current_counts = _index(current_list, current_name)

    for counts, name in ((baseline_counts, "baseline"), (current_counts, "current run")):
        for key, count in counts.items():
            if count > 1:
                findings.append(Finding(key, CONFIGURATION, None, None, OK,
                                        f"{count} rows with this key in the {name}: the last one is used"))

    for key, base_row in baseline.items():
        cur_row = current.get(key)
        if cur_row is None:
            findings.append(Finding(key, CONFIGURATION, None, None, MISSING, "configuration absent from the current run"))
            continue
        base_ci, cur_ci = _intervals(base_row), _intervals(cur_row)
        for metric in CHECKED_METRICS:
            raw_base = base_row.get(metric)
            if _is_blank(raw_base):
                continue  # not measured in the baseline: not checked
            base = parse_number(raw_base)
            raw_cur = cur_row.get(metric)
            cur = parse_number(raw_cur)
            if base is None:
                findings.append(Finding(key, metric, None, cur, MISSING,
                                        f"baseline value {raw_base!r} is not a finite number"))
                continue
            if cur is None:
                what = "empty" if _is_blank(raw_cur) else f"{raw_cur!r}, not a finite number"
                findings.append(Finding(key, metric, base, None, MISSING, f"current value is {what}"))
                continue
            if metric == SPEEDUP_METRIC and base_ci and cur_ci:
                verdict, note = _check_speedup_intervals(base, cur, base_ci, cur_ci, tolerances)
            else:
                verdict, note = _check(metric, base, cur, tolerances)
            findings.append(Finding(key, metric, base, cur, verdict, note))

    for key, row in current.items():
        if key not in baseline:
            findings.append(Finding(key, CONFIGURATION, None, None, OK, "new: not in the baseline, not checked"))
        share = parse_number(row.get("other_cpu_share"))
        if contended(share):
            findings.append(Finding(key, CONFIGURATION, None, None, OK,
                                    f"timed while other processes took {100 * share:.0f}% of the CPU: "
                                    "its speed-up deserves less trust"))
    if any(row.get("run_status") == INTERRUPTED for row in current_list):
        findings.append(Finding((), CONFIGURATION, None, None, OK,
                                f"{current_name} is an interrupted run: configurations it did not reach are missing"))
    return GateResult(findings, configurations=sum(1 for key in baseline if key in current),
                      baseline_machine=machine(baseline_list), current_machine=machine(current_list),
                      mismatches=differences)


def gate(baseline_path: str | Path, current_path: str | Path, tolerances: Tolerances = Tolerances(),
         allow_mismatch: bool = False) -> GateResult:
    """Read both files with `amg.benchmark.results.read_csv` (which raises `ReportError` naming the file) and compare."""
    return compare(read_csv(baseline_path), read_csv(current_path), tolerances, allow_mismatch)


def _format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) >= 1000:
        return str(int(value))
    return f"{value:.4g}"


def _format_change(finding: Finding) -> str:
    if finding.baseline is None or finding.current is None:
        return "-"
    delta = finding.current - finding.baseline
    if finding.metric in ACCURACY_METRICS:
        return f"{delta:+.4f}"
    if finding.baseline == 0:
        return f"{delta:+.4g}"
    relative = f"{delta / abs(finding.baseline):+.2%}"
    if finding.metric == MACS_METRIC:  # exact counts: a change of 1 MAC must not read as +0.00%
        return f"{delta:+.0f} ({relative})"
    return relative


def summary_line(result: GateResult) -> str:
    checked = f"{result.configurations} configurations, {result.metrics_checked} metrics checked"
    if result.passed:
        return f"PASS: {checked}"
    return f"FAIL: {len(result.regressions)} regressions, {len(result.missing)} missing ({checked})"


def format_findings(result: GateResult, verbose: bool = False) -> str:
    """A table of every finding that is not "ok" (all of them with `verbose`), the notes on
    passing rows (new or duplicated configurations), and a one-line PASS / FAIL summary."""
    shown = [f for f in result.findings if verbose or f.verdict != OK]
    notes = [f for f in result.findings if not verbose and f.verdict == OK and f.note]
    parts = []
    if result.mismatches:
        parts.append("compared although the runs differ (--allow-mismatch):\n"
                     + "\n".join(f"  {line}" for line in result.mismatches))
    if result.baseline_machine != result.current_machine:
        # Accuracy and MACs still compare when both ran the same model file and stored plans;
        # the reader should know that the speed-ups come from two different machines.
        parts.append(f"baseline made on: {result.baseline_machine}\n"
                     f"current made on:  {result.current_machine}")
    if shown:
        headers = ["config", "backend", "precision", "batch", "metric", "baseline", "current", "change", "verdict", "note"]
        table = [[*(f.key if f.key else ("-",) * len(KEY_COLUMNS)), f.metric, _format_value(f.baseline),
                  _format_value(f.current), _format_change(f), f.verdict, f.note] for f in shown]
        parts.append(tabulate(table, headers=headers, tablefmt="github"))
    if notes:
        parts.append("\n".join(["notes:"] + [f"  {'/'.join(map(str, f.key))}: {f.note}" for f in notes]))
    parts.append(summary_line(result))
    return "\n\n".join(parts)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def build_parser(prog: str = "amg gate") -> argparse.ArgumentParser:
    defaults = Tolerances()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare a benchmark CSV with a committed baseline. Exit 0: pass; 1: a regression or a "
                    "missing configuration/metric; 2: usage or input error.",
    )
    parser.add_argument("--baseline", required=True, metavar="FILE", help="committed baseline CSV")
    parser.add_argument("--current", required=True, metavar="FILE", help="CSV of the run to check")
    parser.add_argument("--accuracy-drop", type=_tolerance, default=defaults.accuracy_drop, metavar="X",
                        help=f"largest allowed absolute drop of a 0..1 accuracy metric (default {defaults.accuracy_drop:g})")
    parser.add_argument("--speedup-drop", type=_tolerance, default=defaults.speedup_drop, metavar="X",
                        help="largest allowed relative drop of the in-run speed-up, below 1, for rows without "
                             f"confidence intervals (default {defaults.speedup_drop:g})")
    parser.add_argument("--speedup-min-drop", type=_tolerance, default=defaults.speedup_min_drop, metavar="X",
                        help="with intervals on both sides: a speed-up regresses when the run's 95%% interval lies "
                             "below the baseline's and it lost more than this fraction "
                             f"(default {defaults.speedup_min_drop:g})")
    parser.add_argument("--macs-change", type=_tolerance, default=defaults.macs_change, metavar="X",
                        help=f"largest allowed relative change of MACs, either way (default {defaults.macs_change:g})")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="compare runs made with another device id, thread count, input size or backends "
                             "(refused otherwise, exit 2)")
    parser.add_argument("--verbose", action="store_true", help="list the passing checks too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2
    try:
        tolerances = Tolerances(args.accuracy_drop, args.macs_change, args.speedup_drop, args.speedup_min_drop)
    except ValueError as error:
        parser.error(str(error))
    try:
        result = gate(args.baseline, args.current, tolerances, args.allow_mismatch)
    except ReportError as error:
        print(f"amg gate: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_findings(result, verbose=args.verbose))
    return EXIT_PASS if result.passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
