"""Reading a results CSV: typed columns, every value checked against its column's rule.

A report holds one row per configuration, backend, precision and batch, and a fleet's results
can run to millions of rows. pyarrow's CSV reader parses the file into typed columns (numbers
as floats, NaN where empty; text as categories), and `row_checks`' rules run over whole
columns. Only when something is wrong is the file read again row by row, by the csv module,
so that the error names the line, the column and the value as written; that reading is the
reference: whatever it accepts is the file's content.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from amg.benchmark.results import COLUMNS, KEY_COLUMNS, OPTIONAL_COLUMNS, ReportError
from amg.benchmark.row_checks import (
    NUMBER_RULES,
    SPEEDUP_INTERVALS,
    check_row,
    choice_accepted,
    interval_violations,
    number_violations,
)
from amg.errors import InputError

# Must not be empty in any row: a row without them cannot be told apart or traced to its run.
REQUIRED_COLUMNS = KEY_COLUMNS + ("device_id", "run_id")


@dataclass(frozen=True)
class ResultsFile:
    path: Path
    # Numbers as floats (NaN: not measured), text as categories ("" when empty); the columns read.
    frame: pd.DataFrame

    @cached_property
    def rows(self) -> list[dict[str, str]]:
        """Every row as text, the way the CSV writes it, for the readers that go row by row."""
        texts = [self.frame[c].map(number_text).tolist() if c in NUMBER_RULES else self.frame[c].astype(str).tolist()
                 for c in self.frame.columns]
        return [dict(zip(self.frame.columns, values)) for values in zip(*texts)]


def number_text(value: float) -> str:
    """A number of the frame as text: whole numbers without a decimal point, others exactly."""
    if value != value:  # NaN: not measured
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def read_csv(path: str | Path, columns: Iterable[str] | None = None) -> ResultsFile:
    """Read and validate one results CSV: its header, each row's fields, every value against
    its column's rule. With `columns`, the frame keeps only those (and the keys): what a reader
    of a million rows needs in memory. Raises `ReportError` naming the file and, for a bad
    value, the line and the column."""
    path = Path(path)
    header = _header(path)
    wanted = _wanted(header, columns)
    try:
        frame = _parsed(path, header, wanted)
    except (pa.ArrowInvalid, UnicodeDecodeError, _Refused):
        frame = frame_of_rows(_read_row_by_row(path, header), wanted)  # raises, worded, for a bad file
    return ResultsFile(path, _completed(frame, wanted))


class _Refused(Exception):
    """The fast reading found a value out of its rule: read again row by row to word it."""


def _header(path: Path) -> list[str]:
    if not path.is_file():
        raise ReportError(f"results file not found: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as stream:
            first = stream.readline().decode("utf-8")
            stream.seek(max(0, size - 1))
            last_byte = stream.read(1)
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    if not first.strip():
        raise ReportError(f"{path} is empty")
    if last_byte != b"\n":
        raise ReportError(f"{path} is truncated: its last line is incomplete")
    header = next(csv.reader([first]))
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:  # a second column of one name would hide the first from every reader
        raise ReportError(f"{path} has the column(s) {repeated} more than once")
    missing = [c for c in COLUMNS if c not in header and c not in OPTIONAL_COLUMNS]
    if missing:
        raise ReportError(f"{path} lacks columns {missing}")
    return header


def _wanted(header: list[str], columns: Iterable[str] | None) -> list[str]:
    everything = header + [c for c in OPTIONAL_COLUMNS if c not in header]
    if columns is None:
        return everything
    asked = list(columns)
    unknown = [c for c in asked if c not in everything]
    if unknown:
        raise InputError(f"no such results column: {unknown}")
    return list(dict.fromkeys([*REQUIRED_COLUMNS, *asked]))


def _parsed(path: Path, header: list[str], wanted: list[str]) -> pd.DataFrame:
    """Every column parsed by pyarrow and checked column by column, the `wanted` ones kept;
    `_Refused` (or pyarrow's own error) for anything the row-by-row reading must word."""
    types = {c: pa.float64() if c in NUMBER_RULES else pa.dictionary(pa.int32(), pa.string()) for c in header}
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                               column_types=types, null_values=[""],
                               strings_can_be_null=False, quoted_strings_can_be_null=False))
    if table.num_rows == 0:
        raise ReportError(f"{path} has a header but no rows")
    bad = np.zeros(table.num_rows, dtype=bool)
    for column in header:
        values = table.column(column)
        if column in NUMBER_RULES:
            if pc.any(pc.invert(pc.is_finite(values))).as_py():  # "nan", "inf" written, not left empty
                raise _Refused(column)
            numbers = values.to_numpy(zero_copy_only=False)  # empty (null) -> NaN
            bad |= number_violations(column, numbers)
            if column in REQUIRED_COLUMNS:
                bad |= np.isnan(numbers)
        elif _holds(values, lambda text: text == "" if column in REQUIRED_COLUMNS
                    else not choice_accepted(column, text)):
            raise _Refused(column)
    for triple in SPEEDUP_INTERVALS:
        if any(column in header for column in triple):
            bad |= interval_violations(*(_floats(table, column) for column in triple))
    if bad.any():
        raise _Refused("a value out of its rule")
    table = table.select([c for c in wanted if c in header])
    frame = table.to_pandas(self_destruct=True, split_blocks=True)
    del table
    pa.default_memory_pool().release_unused()  # the columns left out, back to the system before the next file
    return frame


def _floats(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table.column(column).to_numpy(zero_copy_only=False)


def _holds(values: pa.ChunkedArray, refused: Callable[[str], bool]) -> bool:
    """Whether a row of a dictionary-encoded text column holds a `refused` value (each distinct
    value tested once, not each row)."""
    for chunk in values.chunks:
        bad = [code for code, text in enumerate(chunk.dictionary.to_pylist()) if refused(text)]
        if bad and pc.any(pc.is_in(chunk.indices, pa.array(bad, chunk.indices.type))).as_py():
            return True
    return False


def _read_row_by_row(path: Path, header: list[str]) -> list[dict[str, str]]:
    """Every row, read by the csv module and checked one by one: the first bad one raises
    `ReportError` naming its line and column."""
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as stream:
            records = csv.reader(stream)
            next(records)
            for line_number, values in enumerate(records, start=2):
                rows.append(_checked_row(path, line_number, header, values))
    except UnicodeDecodeError as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    except csv.Error as error:  # e.g. an unclosed quote swallowing the rest of the file
        raise ReportError(f"{path} is not a valid CSV: {error}") from error
    if not rows:
        raise ReportError(f"{path} has a header but no rows")
    return rows


def _checked_row(path: Path, line_number: int, header: list[str], values: list[str]) -> dict[str, str]:
    if len(values) != len(header):
        raise ReportError(f"{path} line {line_number}: {len(values)} fields, header has {len(header)}")
    row = {**dict.fromkeys(OPTIONAL_COLUMNS, ""), **dict(zip(header, values))}
    empty_keys = [c for c in REQUIRED_COLUMNS if not row[c]]
    if empty_keys:
        raise ReportError(f"{path} line {line_number}: empty {empty_keys}")
    try:
        check_row(row, f"{path} line {line_number}")
    except InputError as error:
        raise ReportError(str(error)) from None
    return row


def frame_of_rows(rows: Iterable[dict[str, object]], columns: Iterable[str]) -> pd.DataFrame:
    """Rows given as mappings (text or numbers, checked by `check_row`), typed as `read_results`
    types a file: numbers as floats (NaN: empty), text as categories."""
    rows = list(rows)
    frame = {}
    for column in columns:
        values = [row.get(column) for row in rows]
        if column in NUMBER_RULES:
            frame[column] = pd.to_numeric(pd.Series([_number_or_nan(v) for v in values], dtype=object))
        else:
            frame[column] = pd.Series(["" if v is None else str(v) for v in values], dtype="category")
    return pd.DataFrame(frame, index=pd.RangeIndex(len(rows)))


def _number_or_nan(value: object) -> float:
    text = "" if value is None else str(value).strip()
    return float(text) if text else np.nan



def _completed(frame: pd.DataFrame, wanted: list[str]) -> pd.DataFrame:
    """`frame` with every wanted column, in order: a column the file lacks (added to the schema
    after it was written) reads as not measured."""
    for column in wanted:
        if column not in frame.columns:
            frame[column] = np.nan if column in NUMBER_RULES else pd.Series("", index=frame.index, dtype="category")
    return frame[wanted]
