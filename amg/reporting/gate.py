"""`amg gate`: compare a benchmark run with a committed baseline, and fail on regressions.

Rows are matched by `amg.benchmark.results.KEY_COLUMNS` (batch as an integer). Checked, per baseline
configuration:

- accuracy (query/occluded Rank-1, mAP, and Rank-5 / mINP when the baseline has them): a drop
  of more than `Tolerances.accuracy_drop` (absolute, on 0..1 metrics) fails;
- `macs` (exact multiply-adds per image): any relative change beyond `Tolerances.macs_change`
  fails, increases included (by default any change at all: a changed count means changed code);
- `speedup` (unpruned median / this median, measured interleaved in the same run), in one of
  two ways (`SpeedupRule`):
  - against a baseline from the same CPU model and thread count (`SAME_CPU`): when both rows
    carry its 95% bootstrap interval, it fails when the run's interval lies wholly below the
    baseline's and it lost more than `Tolerances.speedup_min_drop`; otherwise a drop of more
    than `Tolerances.speedup_drop` (relative) fails;
  - on a CPU that has no baseline (`MACS_SHARE`): a speed-up is a property of the CPU model
    (the same plan runs 7% faster on one and 7% slower on another), so it is held to what
    pruning must buy anywhere instead: a configuration saving at least
    `Tolerances.share_floor` of the MACs, on the axes whose saving reached latency on every
    CPU measured (heads, the class-token block), fails when its interval lies wholly below
    1 + `Tolerances.speedup_share` x its MACs saving.
  Absolute latencies are never compared across runs: they depend on the machine and its load.
  `amg.reporting.baselines` picks the rule: it finds the run's CPU's baseline in a folder.

Runs that cannot be compared are refused (exit 2) unless `allow_mismatch`: another
`device_id`, another thread count or input size, or no backend in common; with it, the
differences are printed above the verdict.

It fails closed: a baseline configuration absent from the run, or a metric the baseline has
but the run lacks (empty, NaN or not a number), is "missing" and fails. Metrics empty in the
baseline are not checked; configurations only in the run are reported as notes.

The command line (`amg gate`) is `amg.reporting.gate_cli`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from amg.benchmark.results import INTERRUPTED, KEY_COLUMNS, ReportError, csv_cell
from amg.benchmark.results_file import ResultsFile, frame_of_rows, read_csv
from amg.benchmark.row_checks import check_row
from amg.errors import InputError
from amg.measure.contention import CONTENDED_SHARE
from amg.reporting.run_frames import (
    COMPARABLE_COLUMNS,
    RowKeys,
    distinct_text,
    machine,
    matching_keys,
    mismatches,
    parse_number,
)

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


class SpeedupRule(enum.Enum):
    """How a run's speed-ups are judged: against the baseline's, measured on the same CPU
    model, or (no such baseline) against the share of the MACs saving they must keep."""

    SAME_CPU = "same-cpu"
    MACS_SHARE = "macs-share"


# The MACs-share rule holds only the axes whose saving reached latency on every CPU measured
# (heads, the class-token block; README, "CI and the gate"): plans pruning these columns fall
# outside it. Static K/V tokens alone, at batch 1, ran 0.97-1.01x (AMD EPYC) and 0.94-0.96x
# (Intel Xeon) in eager PyTorch, 0.94-1.03x and 1.00-1.05x in ONNX Runtime, and added to heads
# 25% + the class-token block they took the Intel's eager speed-up from 1.07 to 1.01. MLP
# channels are not in CI's profile: unmeasured, so not held.
_POLICY_COLUMNS_OUTSIDE_THE_SHARE_RULE = ("token_policy", "mlp_policy")

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
    # On a CPU without a baseline (MACS_SHARE): the share of the MACs saving that must show as
    # speed-up, and the smallest saving held to it. The lowest share measured on the heads /
    # class-token plans of CI's profile was 0.27 (an Intel Xeon's eager PyTorch, the class-token
    # block; AMD EPYC 0.42): 0.15 is 55% of it, room for a CPU that converts almost half as well
    # as the worst seen. Below 7% of MACs, 1 + 0.15 x saving is within 1% of 1: a lost saving,
    # measured to +-1%, would not fall below it.
    speedup_share: float = 0.15
    share_floor: float = 0.07

    def __post_init__(self) -> None:
        for name in ("accuracy_drop", "macs_change", "speedup_drop", "speedup_min_drop", "speedup_share",
                     "share_floor"):
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
    speedup_rule: SpeedupRule = SpeedupRule.SAME_CPU
    basis: str = ""  # which baseline was used, and why (amg.reporting.baselines)
    metrics_checked: int = 0  # values judged, passing ones included (findings keep only failures and notes)

    @property
    def passed(self) -> bool:
        return all(f.verdict == OK for f in self.findings)

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == REGRESSION]

    @property
    def missing(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == MISSING]


class RunMismatch(ReportError):
    """The baseline and the run were made under different conditions (device, threads, input, backends)."""


def held_to_the_share_rule(row: Mapping[str, Any], tol: Tolerances) -> bool:
    """Whether `row`'s configuration saves enough MACs, on axes that convert on every CPU measured,
    for the MACS_SHARE rule to judge its speed-up."""
    saving = parse_number(row.get("macs_saving"))
    pruned_elsewhere = any(str(row.get(column) or "none").strip() != "none"
                           for column in _POLICY_COLUMNS_OUTSIDE_THE_SHARE_RULE)
    return bool(_held(np.nan if saving is None else saving, pruned_elsewhere, tol))


def held_rows(frame: pd.DataFrame, tol: Tolerances) -> np.ndarray:
    """`held_to_the_share_rule` for every row of a frame at once."""
    pruned_elsewhere = np.zeros(len(frame), dtype=bool)
    for column in _POLICY_COLUMNS_OUTSIDE_THE_SHARE_RULE:
        policy = distinct_text(frame, column)
        pruned_elsewhere |= (policy != "none") & (policy != "")
    return _held(frame["macs_saving"].to_numpy(dtype=float), pruned_elsewhere, tol)


def _held(saving, pruned_elsewhere, tol: Tolerances):
    with np.errstate(invalid="ignore"):
        return ~np.isnan(saving) & (saving >= tol.share_floor - _EPSILON) & ~pruned_elsewhere


def required_speedup(macs_saving, tol: Tolerances):
    """MACS_SHARE: the speed-up a configuration must keep, 1 + share x its MACs saving (the
    baseline's saving: the run's MACs are gated to be the baseline's)."""
    return 1 + tol.speedup_share * macs_saving


# The columns the gate keeps of a file (read_csv checks them all).
GATE_COLUMNS = (*KEY_COLUMNS, "run_status", "device_name", *COMPARABLE_COLUMNS, *CHECKED_METRICS,
                "speedup_ci_low", "speedup_ci_high", "macs_saving", *_POLICY_COLUMNS_OUTSIDE_THE_SHARE_RULE,
                "other_cpu_share")


def read_for_gate(path) -> ResultsFile:
    """A run's or a baseline's file, as read_csv checks it, keeping the columns the gate reads."""
    return read_csv(path, GATE_COLUMNS)


def _frame_and_name(rows: ResultsFile | Iterable[Mapping[str, Any]], default: str) -> tuple[pd.DataFrame, str]:
    if isinstance(rows, ResultsFile):
        return rows.frame, str(rows.path)  # read_csv checked every row
    rows = list(rows)
    for index, row in enumerate(rows, start=1):
        try:
            check_row({column: csv_cell(value) for column, value in row.items()}, f"{default} row {index}")
        except InputError as error:
            raise ReportError(str(error)) from None
    return frame_of_rows(rows, GATE_COLUMNS), default


@dataclass(frozen=True)
class _Sides:
    """The baseline's and the run's values of one column, for the configurations both measured."""

    base: np.ndarray
    cur: np.ndarray


@dataclass(frozen=True)
class _Matched:
    """The configurations both runs measured: each one's row in the baseline and in the run."""

    baseline: pd.DataFrame
    current: pd.DataFrame
    base_at: np.ndarray
    cur_at: np.ndarray
    held: np.ndarray  # held_rows of the baseline's rows

    def sides(self, column: str) -> _Sides:
        return _Sides(self.baseline[column].to_numpy(dtype=float)[self.base_at],
                      self.current[column].to_numpy(dtype=float)[self.cur_at])


def _metric_checks(metric: str, matched: _Matched, tol: Tolerances, rule: SpeedupRule):
    """(which rows are judged, the baseline value shown, which regressed, a note for row i) of
    one metric over the matched configurations."""
    base, cur = (values := matched.sides(metric)).base, values.cur
    judged = ~np.isnan(base)  # not measured in the baseline: not checked
    if metric in ACCURACY_METRICS:
        fails = cur < base - tol.accuracy_drop - _EPSILON
        return judged, base, fails, lambda i: f"dropped {base[i] - cur[i]:.4f}, tolerance {tol.accuracy_drop:g}"
    if metric == MACS_METRIC:
        fails = np.abs(cur - base) > tol.macs_change * np.abs(base) + _EPSILON * np.maximum(1.0, np.abs(base))
        return judged, base, fails, lambda i: (f"{'increased' if cur[i] > base[i] else 'decreased'}: MACs must not "
                                               f"change (tolerance {tol.macs_change:g} relative)")
    low, high = matched.sides("speedup_ci_low"), matched.sides("speedup_ci_high")
    cur_ci = ~np.isnan(low.cur) & ~np.isnan(high.cur)
    if rule is SpeedupRule.MACS_SHARE:
        floor = required_speedup(matched.sides("macs_saving").base, tol)  # what the table shows as the bar to reach
        fails = np.where(cur_ci, high.cur, cur) < floor - _EPSILON

        def share_note(i: int) -> str:
            measured = f"interval [{low.cur[i]:.3f}, {high.cur[i]:.3f}]" if cur_ci[i] else f"{cur[i]:.3f}"
            return (f"pruning's speed-up is lost: {measured} below 1 + {tol.speedup_share:g} x MACs saving = "
                    f"{floor[i]:.3f} (the least it must keep on any CPU)")
        return judged & matched.held, floor, fails, share_note
    both_ci = cur_ci & ~np.isnan(low.base) & ~np.isnan(high.base)
    by_interval = (high.cur < low.base) & (cur < base * (1 - tol.speedup_min_drop) - _EPSILON)
    by_drop = cur < base * (1 - tol.speedup_drop) - _EPSILON

    def speedup_note(i: int) -> str:
        if both_ci[i]:
            return (f"speed-up fell to {cur[i] / base[i]:.1%} of baseline: interval [{low.cur[i]:.3f}, "
                    f"{high.cur[i]:.3f}] below [{low.base[i]:.3f}, {high.base[i]:.3f}]")
        return f"speed-up fell to {cur[i] / base[i]:.1%} of baseline, tolerance {tol.speedup_drop:g}"
    return judged, base, np.where(both_ci, by_interval, by_drop), speedup_note


def compare(
    baseline_rows: ResultsFile | Iterable[Mapping[str, Any]],
    current_rows: ResultsFile | Iterable[Mapping[str, Any]],
    tolerances: Tolerances = Tolerances(),
    allow_mismatch: bool = False,
    speedup_rule: SpeedupRule = SpeedupRule.SAME_CPU,
    keep_passing: bool = False,
) -> GateResult:
    """Compare rows of a run with rows of a baseline (CSV rows as dicts, or `ResultsFile`s);
    `speedup_rule` says whether the baseline's speed-ups are this CPU's (`SAME_CPU`) or not.
    Findings are the failures and the notes; `keep_passing` adds every passing check.

    Raises `ReportError` for a row whose key columns are empty or whose batch is not an integer,
    and `RunMismatch` for runs made under other conditions (`mismatches`) unless `allow_mismatch`.
    """
    baseline_frame, baseline_name = _frame_and_name(baseline_rows, "baseline")
    current_frame, current_name = _frame_and_name(current_rows, "current")
    if not len(baseline_frame):
        return GateResult([Finding((), BASELINE, None, None, MISSING, f"{baseline_name} has no rows: nothing to compare")])
    if (distinct_text(baseline_frame, "run_status") == INTERRUPTED).any():
        raise ReportError(f"{baseline_name} is an interrupted run: it cannot be a baseline (measure it again)")
    differences = mismatches(baseline_frame, current_frame)
    if differences and not allow_mismatch:
        raise RunMismatch(f"{current_name} was not made under the conditions of {baseline_name}: "
                          + "; ".join(differences) + " (--allow-mismatch compares them anyway)")
    base_keys, cur_keys = matching_keys((baseline_frame, baseline_name), (current_frame, current_name))
    cur_at = pd.Index(cur_keys.codes).get_indexer(base_keys.codes)  # each baseline row's in the run, or -1
    base_at = np.flatnonzero(cur_at >= 0)
    cur_at = cur_at[base_at]
    findings: list[tuple[tuple, Finding]] = []  # (order, finding): the baseline's row order, then metric order
    for position in np.flatnonzero(~np.isin(base_keys.codes, cur_keys.codes)):
        findings.append(((position, -1), Finding(base_keys.of(position), CONFIGURATION, None, None, MISSING,
                                                 "configuration absent from the current run")))
    both = _Matched(baseline_frame, current_frame, base_at, cur_at, held_rows(baseline_frame, tolerances)[base_at])
    checked = 0
    for order, metric in enumerate(CHECKED_METRICS):
        values = both.sides(metric)
        judged, shown, fails, note = _metric_checks(metric, both, tolerances, speedup_rule)
        lacking = judged & np.isnan(values.cur)
        failing = judged & ~lacking & fails
        checked += int(judged.sum())
        for i in np.flatnonzero(lacking):
            findings.append(((base_at[i], order), Finding(base_keys.of(base_at[i]), metric, float(shown[i]), None, MISSING,
                                                          "current value is empty")))
        for i in np.flatnonzero(failing):
            findings.append(((base_at[i], order), Finding(base_keys.of(base_at[i]), metric, float(shown[i]), float(values.cur[i]),
                                                          REGRESSION, note(i))))
        if keep_passing:
            for i in np.flatnonzero(judged & ~lacking & ~fails):
                findings.append(((base_at[i], order), Finding(base_keys.of(base_at[i]), metric, float(shown[i]),
                                                              float(values.cur[i]), OK)))
    findings.sort(key=lambda pair: pair[0])
    new = np.flatnonzero(~np.isin(cur_keys.codes, base_keys.codes))
    notes = _notes(new, current_frame, cur_keys, current_name)
    return GateResult([finding for _, finding in findings] + notes, configurations=len(base_at),
                      baseline_machine=machine(baseline_frame), current_machine=machine(current_frame),
                      mismatches=differences, speedup_rule=speedup_rule, metrics_checked=checked)


def _notes(new: np.ndarray, current: pd.DataFrame, cur_keys: RowKeys, current_name: str) -> list[Finding]:
    """Passing notes on the run's rows, in its row order: configurations new to it (`new`, their
    positions), rows timed under contention."""
    share = current["other_cpu_share"].to_numpy(dtype=float)
    new = set(new.tolist())
    notes = []
    for position in sorted(new | set(np.flatnonzero(share > CONTENDED_SHARE).tolist())):
        key = cur_keys.of(position)
        if position in new:
            notes.append(Finding(key, CONFIGURATION, None, None, OK, "new: not in the baseline, not checked"))
        if share[position] > CONTENDED_SHARE:
            notes.append(Finding(key, CONFIGURATION, None, None, OK,
                                 f"timed while other processes took {100 * share[position]:.0f}% of the CPU: "
                                 "its speed-up deserves less trust"))
    if (distinct_text(current, "run_status") == INTERRUPTED).any():
        notes.append(Finding((), CONFIGURATION, None, None, OK,
                             f"{current_name} is an interrupted run: configurations it did not reach are missing"))
    return notes
