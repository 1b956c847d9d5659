"""What each column of a results CSV may hold: one rule per column, checked on every row read.

A value out of its range is an error naming the file, the line and the column, never a number
the gate, the report or `amg select` would go on to use: an accuracy of 85 (percent, not a
fraction), a speed-up of -5 outside its own interval, a median of -3 ms, a status spelled
" Interrupted". Empty means "not measured" and is always allowed here (the gate decides what
must be measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from amg.errors import InputError

# A rule's test takes one float or a whole column (a numpy array) alike: `check_row` words the
# error for one row, `first_violation` finds it among a million rows at array speed.
Number = float | np.ndarray


@dataclass(frozen=True)
class Rule:
    accepts: Callable[[Number], bool | np.ndarray]
    means: str  # what the column must hold, for the message


def _fraction(value: Number):
    return (value >= 0.0) & (value <= 1.0)


def _positive(value: Number):
    return value > 0


def _non_negative(value: Number):
    return value >= 0


def _count(value: Number):
    return (value >= 0) & (value == np.floor(value))


def _whole_positive(value: Number):
    return (value >= 1) & (value == np.floor(value))


def _at_most_one(value: Number):
    return value <= 1.0


def _cosine(value: Number):
    return (value >= -1.0 - 1e-6) & (value <= 1.0 + 1e-6)


FRACTION = Rule(_fraction, "a fraction between 0 and 1")
POSITIVE = Rule(_positive, "a number > 0")
NON_NEGATIVE = Rule(_non_negative, "a number >= 0")
COUNT = Rule(_count, "a whole number >= 0")
WHOLE_POSITIVE = Rule(_whole_positive, "a whole number >= 1")
AT_MOST_ONE = Rule(_at_most_one, "a number <= 1")
COSINE = Rule(_cosine, "a cosine between -1 and 1")

ACCURACY_COLUMNS = tuple(f"{split}_{metric}" for split in ("query", "occluded")
                         for metric in ("rank1", "rank5", "mAP", "mINP"))
SPEEDUP_INTERVALS = (("speedup", "speedup_ci_low", "speedup_ci_high"),
                     ("fp32_speedup", "fp32_speedup_ci_low", "fp32_speedup_ci_high"))

NUMBER_RULES: dict[str, Rule] = {
    "threads": WHOLE_POSITIVE,
    "batch": WHOLE_POSITIVE,
    "head_ratio": FRACTION,
    "token_ratio": NON_NEGATIVE,  # ToMe's merge rate can exceed 1 (tokens merged per block / kept share)
    "mlp_ratio": FRACTION,
    "params": COUNT,
    "param_mb": NON_NEGATIVE,
    "macs": COUNT,
    "gmacs": NON_NEGATIVE,
    "macs_saving": FRACTION,
    "latency_median_ms": POSITIVE,
    "latency_p90_ms": POSITIVE,
    "latency_p99_ms": POSITIVE,
    "latency_rounds": WHOLE_POSITIVE,
    **{column: POSITIVE for triple in SPEEDUP_INTERVALS for column in triple},
    "latency_saving": AT_MOST_ONE,  # 1 - 1/speed-up: negative when pruning made it slower
    "load_avg_1min": NON_NEGATIVE,
    "other_cpu_share": FRACTION,
    "output_max_diff": NON_NEGATIVE,
    "output_cosine": COSINE,
    "peak_rss_mb": NON_NEGATIVE,
    "forward_rss_mb": NON_NEGATIVE,
    "cuda_max_allocated_mb": NON_NEGATIVE,
    **{column: FRACTION for column in ACCURACY_COLUMNS},
    "query_unmatched": COUNT,
    "occluded_unmatched": COUNT,
}
# Text columns with a closed set of values (exactly as the suite writes them).
CHOICES: dict[str, tuple[str, ...]] = {
    "run_status": ("complete", "interrupted"),
    "last_block": ("full", "class-token"),
}
_INTERVAL_SLACK = 1e-9  # the CSV's 10 significant digits round a value and its bounds alike


def finite_number(text: str) -> float | None:
    """The number in `text`, or None when it is not a finite number."""
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def choice_accepted(column: str, value: str) -> bool:
    """Whether a text column with a closed set of values (`CHOICES`; any other column: anything) may hold `value`."""
    return not value or column not in CHOICES or value in CHOICES[column]


def check_row(row: Mapping[str, str], where: str) -> None:
    """Raise InputError naming `where` (file and line) and the column for a value out of its rule."""
    numbers: dict[str, float] = {}
    for column, rule in NUMBER_RULES.items():
        text = (row.get(column) or "").strip()
        if not text:
            continue
        number = finite_number(text)
        if number is None:
            raise InputError(f"{where}: {column} {text!r} is not a number (a finite one; empty if not measured)")
        if not bool(rule.accepts(number)):
            raise InputError(f"{where}: {column} {text!r} must be {rule.means}")
        numbers[column] = number
    for column, choices in CHOICES.items():
        value = row.get(column) or ""
        if not choice_accepted(column, value):
            raise InputError(f"{where}: {column} {value!r} is none of {', '.join(choices)}")
    for center, low, high in SPEEDUP_INTERVALS:
        _check_interval(numbers, center, low, high, where)


def _check_interval(numbers: Mapping[str, float], center: str, low: str, high: str, where: str) -> None:
    bounds = [column for column in (low, high) if column in numbers]
    if not bounds:
        return
    if len(bounds) == 1 or center not in numbers:
        raise InputError(f"{where}: {', '.join(bounds)} without {' and '.join(c for c in (center, low, high) if c not in numbers)}: "
                         "an interval needs both bounds and its value")
    slack = _INTERVAL_SLACK * numbers[center]
    if not numbers[low] - slack <= numbers[center] <= numbers[high] + slack:
        raise InputError(f"{where}: {center} {numbers[center]:g} lies outside its own interval "
                         f"[{numbers[low]:g}, {numbers[high]:g}]")


def number_violations(column: str, values: np.ndarray) -> np.ndarray:
    """Which of many rows' values (floats, NaN: empty) break `column`'s rule; `check_row` on such
    a row words the error."""
    with np.errstate(invalid="ignore"):
        return ~np.isnan(values) & ~(np.isfinite(values) & NUMBER_RULES[column].accepts(values))


def interval_violations(center: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Which of many rows' speed-up intervals (one of `SPEEDUP_INTERVALS`, NaN: empty) are incomplete
    or do not hold their value."""
    return _outside_interval(center, low, high)


def _outside_interval(center: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    has_low, has_high, has_center = ~np.isnan(low), ~np.isnan(high), ~np.isnan(center)
    bounded = has_low & has_high & has_center
    slack = _INTERVAL_SLACK * np.where(bounded, center, 0.0)
    with np.errstate(invalid="ignore"):
        inside = (low - slack <= center) & (center <= high + slack)
    return ((has_low | has_high) & ~bounded) | (bounded & ~inside)
