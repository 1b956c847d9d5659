"""Reading a results CSV: the typed (pyarrow) reading and the row-by-row one agree, and what
only the row-by-row reading can word is still refused, named."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from amg.benchmark.results import ReportError
from amg.benchmark.results_file import _read_row_by_row, _header, frame_of_rows, read_csv
from amg.reporting.gate import compare

CI_BASELINE = "results/baselines/ci-python-2core/amd-epyc-2t.csv"


def _copy_with(tmp_path, column: str, value: str, line: int = 3):
    """The committed CI baseline with one cell of one line (2 = the first row) replaced."""
    lines = open(CI_BASELINE, encoding="utf-8").read().splitlines()
    header = lines[0].split(",")
    rows = list(csv.reader(io.StringIO("\n".join(lines) + "\n")))
    rows[line - 1][header.index(column)] = value
    path = tmp_path / "run.csv"
    with open(path, "w", encoding="utf-8", newline="") as stream:
        csv.writer(stream, lineterminator="\n").writerows(rows)
    return path


def test_the_typed_reading_equals_the_row_by_row_reading():
    path = read_csv(CI_BASELINE).path
    typed = read_csv(path).frame
    reference = frame_of_rows(_read_row_by_row(path, _header(path)), list(typed.columns))
    assert list(typed.columns) == list(reference.columns) and len(typed) == 44
    for column in typed.columns:
        if typed[column].dtype == float:
            np.testing.assert_array_equal(typed[column].to_numpy(), reference[column].to_numpy(), err_msg=column)
        else:
            assert typed[column].astype(str).tolist() == reference[column].astype(str).tolist(), column


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_a_written_non_finite_number_is_refused_not_read_as_empty(tmp_path, value):
    with pytest.raises(ReportError, match=rf"line 3: speedup '{value}' is not a number"):
        read_csv(_copy_with(tmp_path, "speedup", value))


def test_what_pyarrow_cannot_parse_but_the_schema_allows_is_read_as_the_csv_module_reads_it(tmp_path):
    path = _copy_with(tmp_path, "query_rank1", " 0.5 ")  # spaces around a number: read by the row-by-row path
    frame = read_csv(path).frame
    assert frame["query_rank1"].iat[1] == 0.5


def test_a_bad_text_value_is_named(tmp_path):
    with pytest.raises(ReportError, match=r"line 3: run_status 'Complete' is none of complete, interrupted"):
        read_csv(_copy_with(tmp_path, "run_status", "Complete"))
    with pytest.raises(ReportError, match=r"line 3: empty \['config_id'\]"):
        read_csv(_copy_with(tmp_path, "config_id", ""))


def test_a_short_row_is_named(tmp_path):
    lines = open(CI_BASELINE, encoding="utf-8").read().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]
    path = tmp_path / "short.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ReportError, match=r"line 3: 63 fields, header has 64"):
        read_csv(path)


def test_columns_keep_only_what_a_reader_needs_but_every_column_is_checked(tmp_path):
    kept = read_csv(CI_BASELINE, ["speedup"]).frame
    assert {"speedup", "config_id", "batch", "run_id"} <= set(kept.columns) and "latency_p99_ms" not in kept.columns
    with pytest.raises(ReportError, match=r"latency_p99_ms '-1' must be a number > 0"):
        read_csv(_copy_with(tmp_path, "latency_p99_ms", "-1"), ["speedup"])


def test_the_gate_on_many_rows_keeps_only_failures_and_counts_every_check(tmp_path):
    """Findings for a million passing checks would not fit in memory: only failures are kept."""
    baseline = read_csv(CI_BASELINE)
    result = compare(baseline, baseline)
    assert result.passed and result.metrics_checked > 400 and not [f for f in result.findings if f.metric != "(configuration)"]
    assert len(compare(baseline, baseline, keep_passing=True).findings) == result.metrics_checked
