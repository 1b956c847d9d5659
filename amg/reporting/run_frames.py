"""What the gate and the baselines read of a run: its rows' text, the machine that made it,
the conditions two runs must share, and each row's key (config_id, backend, precision, batch).

Runs come as frames (`amg.benchmark.results_file`): text as categories, numbers as floats;
what is worked out per value is worked out once per distinct value, so that a million rows
cost array operations, not a million Python steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from amg.benchmark.results import KEY_COLUMNS, ReportError
from amg.benchmark.results_file import number_text


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


def distinct_text(frame: pd.DataFrame, column: str) -> np.ndarray:
    """Each row's value of `column` as stripped text ("" when empty; numbers as the CSV writes
    them), made once per distinct value."""
    values = frame[column]
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes, distinct = values.cat.codes.to_numpy(), values.cat.categories
    else:
        codes, distinct = pd.factorize(values)  # empty (NaN, None) -> code -1
    if pd.api.types.is_float_dtype(distinct.dtype):
        texts = np.array([number_text(value) for value in distinct], dtype=object)
    else:
        texts = distinct.astype(str).str.strip().to_numpy(dtype=object)
    return np.append(texts, "")[codes]  # code -1 picks the ""


def machine(frame: pd.DataFrame) -> str:
    """The CPU or GPU (`device_name`) and thread counts that made a run's rows, e.g. "AMD EPYC, 2 threads"."""
    pairs = dict.fromkeys(zip(distinct_text(frame, "device_name"), distinct_text(frame, "threads")))
    return " + ".join(f"{name or 'unknown device'}, {threads or '?'} threads" for name, threads in pairs)


# What must be equal for two runs to be compared: a speed-up measured with other threads, at
# another input size or on another device is another experiment, not a regression.
COMPARABLE_COLUMNS = ("device_id", "threads", "input_size")


def mismatches(baseline: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """How the two runs' conditions differ, one line each (blank values, e.g. older CSVs, are not compared)."""
    found = []
    for column in COMPARABLE_COLUMNS:
        base, cur = (set(distinct_text(frame, column)) - {""} for frame in (baseline, current))
        if base and cur and base != cur:
            found.append(f"{column}: baseline {', '.join(sorted(base))}; current {', '.join(sorted(cur))}")
    base_backends, cur_backends = (set(distinct_text(frame, "backend")) for frame in (baseline, current))
    if len(current) and not base_backends & cur_backends:
        found.append(f"backend: no backend in common (baseline {', '.join(sorted(base_backends))}; "
                     f"current {', '.join(sorted(cur_backends))})")
    return found


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def row_key(row: Mapping[str, Any], source: str, index: int) -> tuple:
    """(config_id, backend, precision, batch as an integer) of a CSV row; `source` and `index` name it in errors."""
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


def index_rows(rows: Iterable[Mapping[str, Any]], source: str) -> dict[tuple, Mapping[str, Any]]:
    """Rows by key; two rows of one key are an error (either could hide a bad value behind the other)."""
    by_key: dict[tuple, Mapping[str, Any]] = {}
    for index, row in enumerate(rows, start=1):
        key = row_key(row, source, index)
        if key in by_key:
            raise ReportError(f"{source} has two rows for {'/'.join(map(str, key))} (rows {list(by_key).index(key) + 1} "
                              f"and {index}): a run measures each configuration once")
        by_key[key] = row
    return by_key


@dataclass(frozen=True)
class RowKeys:
    """Each row's key as one integer, comparable between the two runs it was made for
    (`matching_keys`), and the key's text for naming a row."""

    codes: np.ndarray  # int64 per row
    texts: dict[str, np.ndarray]  # per key column, each row's text (batch: its integer)

    def of(self, position: int) -> tuple:
        return tuple(self.texts[column][position] for column in KEY_COLUMNS)


def matching_keys(first: tuple[pd.DataFrame, str], second: tuple[pd.DataFrame, str]) -> tuple[RowKeys, RowKeys]:
    """The keys of two runs' rows, each (frame, name for errors), coded alike: equal codes, equal
    keys. A row with an empty key column, a batch that is not whole, or a key another row of its
    run has already is an error (either row could hide a bad value behind the other)."""
    texts = [{}, {}]
    codes = [np.zeros(len(frame), dtype=np.int64) for frame, _ in (first, second)]
    for column in KEY_COLUMNS:
        column_codes, distinct = pd.factorize(np.concatenate([_key_column(frame, column, name) for frame, name in
                                                              (first, second)]))
        parts = np.split(column_codes, [len(first[0])])
        for side in (0, 1):
            codes[side] = codes[side] * len(distinct) + parts[side]
            texts[side][column] = np.asarray(distinct, dtype=object)[parts[side]]
        # Renumbered after each column, so the combined code stays below the number of rows.
        combined, _ = pd.factorize(np.concatenate(codes))
        codes = np.split(combined.astype(np.int64), [len(first[0])])
    for side, (_, name) in enumerate((first, second)):
        _refuse_repeated(codes[side], texts[side], name)
    return RowKeys(codes[0], texts[0]), RowKeys(codes[1], texts[1])


def _key_column(frame: pd.DataFrame, column: str, source: str) -> np.ndarray:
    if column == "batch":
        values = frame[column].to_numpy(dtype=float)
        bad = np.flatnonzero(np.isnan(values) | (values != np.floor(values)))
        if bad.size:  # read_csv refuses these; rows given as mappings may carry them
            what = "empty key column 'batch'" if np.isnan(values[bad[0]]) else f"batch {values[bad[0]]!r} is not an integer"
            raise ReportError(f"{source} row {bad[0] + 1}: {what}")
        return values.astype(np.int64).astype(object)
    values = distinct_text(frame, column)
    blank = np.flatnonzero(values == "")
    if blank.size:
        raise ReportError(f"{source} row {blank[0] + 1}: empty key column {column!r}")
    return values


def _refuse_repeated(codes: np.ndarray, texts: dict[str, np.ndarray], source: str) -> None:
    order = np.argsort(codes, kind="stable")
    repeats = np.flatnonzero(codes[order][1:] == codes[order][:-1])
    if repeats.size:
        later = order[repeats + 1]
        second = int(later.min())  # the first row that repeats an earlier one's key
        first = int(np.flatnonzero(codes == codes[second])[0])
        key = tuple(texts[column][first] for column in KEY_COLUMNS)
        raise ReportError(f"{source} has two rows for {'/'.join(map(str, key))} (rows {first + 1} and {second + 1}): "
                          "a run measures each configuration once")
