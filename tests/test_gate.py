"""`amg gate`: baseline comparison, fail-closed rules, exit codes and messages."""

from __future__ import annotations

import copy

import pytest

from amg.benchmark.results import ReportError, write_csv
from amg.benchmark.results_file import read_csv
from amg.reporting.baselines import gate
from amg.reporting.gate import Finding, GateResult, Tolerances, compare
from amg.reporting.run_frames import parse_number
from amg.reporting.gate_cli import format_findings, main


def _row(config_id: str, speedup: float | None, macs: int, rank1: float, mAP: float) -> dict:
    return {
        "run_id": "run", "timestamp": "2026-01-01T00:00:00Z", "device_id": "dev", "device_name": "cpu",
        "backend": "cpu", "precision": "fp32", "threads": 2, "batch": 8, "model": "tiny", "input_size": "128x64",
        "config_id": config_id, "macs": macs, "gmacs": macs / 1e9,
        "latency_median_ms": 10.0, "speedup": speedup,
        "query_rank1": rank1, "query_mAP": mAP, "occluded_rank1": rank1 - 0.2, "occluded_mAP": mAP - 0.2,
    }


BASELINE = [
    _row("unpruned", None, 4_000_000_000, 0.90, 0.75),
    _row("heads50", 1.40, 3_000_000_000, 0.88, 0.72),
    _row("tokens30", 1.25, 3_200_000_000, 0.87, 0.70),
]


def _current() -> list[dict]:
    return copy.deepcopy(BASELINE)


def _pick(rows: list[dict], config_id: str) -> dict:
    return next(r for r in rows if r["config_id"] == config_id)


def _files(tmp_path, current: list[dict], baseline: list[dict] = BASELINE):
    base = write_csv(baseline, tmp_path / "baseline", "dev", "base")
    cur = write_csv(current, tmp_path / "current", "dev", "cur")
    return str(base), str(cur)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _gate(tmp_path, capsys, current: list[dict], *options: str) -> tuple[int, str, str]:
    """`amg gate` of `current` against BASELINE, both written as CSV files."""
    base, cur = _files(tmp_path, current)
    return _run(capsys, "--baseline", base, "--current", cur, *options)


def _line(out: str, config_id: str) -> str:
    """The first line of the gate's table that names `config_id`."""
    return next(line for line in out.splitlines() if config_id in line)


def _bad(result: GateResult) -> list[Finding]:
    return [f for f in result.findings if f.verdict != "ok"]


def test_identical_files_pass(tmp_path, capsys):
    base, cur = _files(tmp_path, _current())
    result = gate(base, cur, Tolerances())
    assert result.passed and not _bad(result)
    # 3 configs x 4 accuracy metrics + 3 macs + 2 speedups (the unpruned row has none)
    assert result.configurations == 3 and result.metrics_checked == 3 * 4 + 3 + 2
    code, out, err = _run(capsys, "--baseline", base, "--current", cur)
    assert code == 0, out + err
    assert out.strip().splitlines()[-1] == "PASS: 3 configurations, 17 metrics checked"


def test_two_point_accuracy_drop_fails_and_names_config_and_metric(tmp_path, capsys):
    current = _current()
    _pick(current, "heads50")["query_mAP"] = 0.72 - 0.02
    code, out, _ = _gate(tmp_path, capsys, current)
    assert code == 1
    table_lines = [line for line in out.splitlines() if "heads50" in line]
    assert len(table_lines) == 1 and "query_mAP" in table_lines[0] and "regression" in table_lines[0]
    assert "unpruned" not in out and "tokens30" not in out  # only failing rows are listed
    assert out.strip().splitlines()[-1].startswith("FAIL: 1 regressions, 0 missing")


def test_half_point_accuracy_drop_passes(tmp_path, capsys):
    current = _current()
    for row in current:
        row["occluded_rank1"] -= 0.005
    code, out, _ = _gate(tmp_path, capsys, current)
    assert code == 0, out


def test_accuracy_improvement_passes():
    current = _current()
    _pick(current, "heads50")["query_rank1"] = 0.99
    assert compare(BASELINE, current).passed


@pytest.mark.parametrize("macs", [3_030_000_000, 2_970_000_000, 3_000_000_001])  # +1%, -1%, +1 MAC
def test_any_macs_change_fails(macs):
    current = _current()
    _pick(current, "heads50")["macs"] = macs
    bad = _bad(compare(BASELINE, current))
    assert [(f.key[0], f.metric, f.verdict) for f in bad] == [("heads50", "macs", "regression")]


def test_macs_tolerance_allows_small_change():
    current = _current()
    _pick(current, "heads50")["macs"] = 3_030_000_000  # +1%
    assert compare(BASELINE, current, Tolerances(macs_change=0.02)).passed
    assert not compare(BASELINE, current, Tolerances(macs_change=0.005)).passed


def test_twenty_percent_slowdown_of_pruned_config_fails(tmp_path, capsys):
    current = _current()
    _pick(current, "tokens30")["speedup"] = 1.25 / 1.2
    code, out, _ = _gate(tmp_path, capsys, current)
    assert code == 1
    line = _line(out, "tokens30")
    assert "speedup" in line and "regression" in line


def test_five_percent_slowdown_passes():
    current = _current()
    _pick(current, "tokens30")["speedup"] = 1.25 / 1.05
    _pick(current, "heads50")["speedup"] = 1.40 / 1.05
    assert compare(BASELINE, current).passed


def test_absolute_latency_is_not_compared():
    current = _current()
    for row in current:
        row["latency_median_ms"] *= 5  # a loaded machine: every row slower, speed-ups unchanged
    assert compare(BASELINE, current).passed


def test_unpruned_speedup_is_not_checked():
    current = _current()
    _pick(current, "unpruned")["speedup"] = 0.5
    result = compare(BASELINE, current)
    assert result.passed
    assert not [f for f in result.findings if f.key[0] == "unpruned" and f.metric == "speedup"]


def test_missing_configuration_fails(tmp_path, capsys):
    current = [r for r in _current() if r["config_id"] != "tokens30"]
    code, out, _ = _gate(tmp_path, capsys, current)
    assert code == 1
    line = _line(out, "tokens30")
    assert "missing" in line
    assert "1 missing" in out.strip().splitlines()[-1]


def test_configuration_with_other_batch_is_missing():
    current = _current()
    _pick(current, "heads50")["batch"] = 16
    bad = _bad(compare(BASELINE, current))
    assert [(f.key, f.verdict) for f in bad] == [(("heads50", "cpu", "fp32", 8), "missing")]


def test_a_metric_that_is_not_a_number_is_an_input_error_naming_file_line_and_column(tmp_path, capsys):
    current = _current()
    _pick(current, "heads50")["occluded_mAP"] = "n/a"
    code, _, err = _gate(tmp_path, capsys, current)
    assert code == 2 and "line 3: occluded_mAP 'n/a' is not a number" in err and "cur.csv" in err


@pytest.mark.parametrize("column, value, message", [
    ("occluded_rank1", 85.0, "must be a fraction between 0 and 1"),  # percent, not a fraction
    ("speedup", -5.0, "must be a number > 0"),
    ("speedup", 0.0, "must be a number > 0"),
    ("latency_median_ms", -3.0, "must be a number > 0"),
    ("macs", 1.5, "must be a whole number >= 0"),
    ("run_status", " Interrupted", "none of complete, interrupted"),
    ("run_status", "Interrupted", "none of complete, interrupted"),
])
def test_a_value_out_of_its_column_s_range_is_refused_in_either_file(tmp_path, capsys, column, value, message):
    bad = _current()
    _pick(bad, "heads50")[column] = value
    for base, cur in ((BASELINE, bad), (bad, BASELINE)):
        with pytest.raises(ReportError, match=message):
            compare(base, cur)
    code, _, err = _gate(tmp_path, capsys, bad)
    assert code == 2 and message in err and column in err


def test_a_speedup_outside_its_own_interval_is_refused(tmp_path, capsys):
    """The gate judges intervals: a speed-up moved while its interval stayed must not pass."""
    with_intervals = [_with_interval(r, r["speedup"] - 0.02, r["speedup"] + 0.02) if r["speedup"] else r
                      for r in BASELINE]
    moved = copy.deepcopy(with_intervals)
    _pick(moved, "heads50")["speedup"] = 1.07
    with pytest.raises(ReportError, match=r"speedup 1.07 lies outside its own interval \[1.38, 1.42\]"):
        compare(with_intervals, moved)
    lone = copy.deepcopy(with_intervals)
    _pick(lone, "heads50")["speedup_ci_high"] = None
    with pytest.raises(ReportError, match="speedup_ci_low without speedup_ci_high"):
        compare(with_intervals, lone)


def test_a_column_twice_in_a_file_is_refused(tmp_path, capsys):
    base, cur = _files(tmp_path, _current())
    lines = open(cur).read().splitlines()
    lines[0] += ",occluded_mAP"
    lines[1:] = [line + ",0.99" for line in lines[1:]]
    open(cur, "w").write("\n".join(lines) + "\n")
    code, _, err = _run(capsys, "--baseline", base, "--current", cur)
    assert code == 2 and "['occluded_mAP'] more than once" in err


@pytest.mark.parametrize("value", [None, float("nan")])
def test_missing_metric_fails(tmp_path, capsys, value):
    current = _current()
    _pick(current, "heads50")["occluded_mAP"] = value
    code, out, _ = _gate(tmp_path, capsys, current)
    assert code == 1
    line = _line(out, "heads50")
    assert "occluded_mAP" in line and "missing" in line


def test_metric_empty_in_baseline_is_not_checked():
    baseline = copy.deepcopy(BASELINE)
    for row in baseline:
        row["occluded_mAP"] = None
    current = _current()
    for row in current:
        row["occluded_mAP"] = None
    result = compare(baseline, current)
    assert result.passed and result.metrics_checked == 3 * 3 + 3 + 2


def test_rank5_checked_when_present_in_baseline():
    baseline = copy.deepcopy(BASELINE)
    _pick(baseline, "heads50")["query_rank5"] = 0.95
    current = _current()
    _pick(current, "heads50")["query_rank5"] = 0.90
    bad = _bad(compare(baseline, current))
    assert [(f.metric, f.verdict) for f in bad] == [("query_rank5", "regression")]


def test_new_configuration_passes_with_a_note(tmp_path, capsys):
    current = _current() + [_row("both40", 1.6, 2_500_000_000, 0.80, 0.60)]
    base, cur = _files(tmp_path, current)
    code, out, _ = _run(capsys, "--baseline", base, "--current", cur)
    assert code == 0, out
    assert "both40" in out and "new" in out
    notes = [f for f in gate(base, cur, Tolerances()).findings if f.key[0] == "both40"]
    assert len(notes) == 1 and notes[0].verdict == "ok" and "new" in notes[0].note


def test_two_rows_of_one_key_are_refused_in_either_file(tmp_path, capsys):
    """A good row after a bad one (or before it) would hide it: neither side may have two."""
    current = _current() + [_row("heads50", 1.40, 3_000_000_000, 0.50, 0.72)]
    with pytest.raises(ReportError, match="two rows for heads50/cpu/fp32/8"):
        compare(BASELINE, current)
    with pytest.raises(ReportError, match="two rows for heads50"):
        compare(current, BASELINE)
    code, _, err = _gate(tmp_path, capsys, current)
    assert code == 2 and "two rows for heads50" in err


def test_missing_baseline_file_exits_2_naming_it(tmp_path, capsys):
    _, cur = _files(tmp_path, _current())
    missing = tmp_path / "nowhere" / "baseline.csv"
    code, out, err = _run(capsys, "--baseline", str(missing), "--current", cur)
    assert code == 2
    assert str(missing) in err and out == ""


def test_truncated_csv_exits_2(tmp_path, capsys):
    base, cur = _files(tmp_path, _current())
    text = open(cur).read()
    broken = tmp_path / "truncated.csv"
    broken.write_text(text[: len(text) - 40])  # cut mid-row
    code, _, err = _run(capsys, "--baseline", base, "--current", str(broken))
    assert code == 2 and str(broken) in err


def test_corrupted_csv_exits_2(tmp_path, capsys):
    base, _ = _files(tmp_path, _current())
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\x00\xff\xfe not,a,results,file\n1,2\n")
    code, _, err = _run(capsys, "--baseline", base, "--current", str(garbage))
    assert code == 2 and str(garbage) in err


def test_non_integer_batch_exits_2(tmp_path, capsys):
    current = _current()
    current[0]["batch"] = "eight"
    base, cur = _files(tmp_path, current)
    code, _, err = _run(capsys, "--baseline", base, "--current", cur)
    assert code == 2 and cur in err and "batch" in err


def test_command_line_tolerances_are_honoured(tmp_path, capsys):
    current = _current()
    _pick(current, "heads50")["query_rank1"] = 0.88 - 0.02
    _pick(current, "tokens30")["speedup"] = 1.25 / 1.2
    _pick(current, "unpruned")["macs"] = 4_040_000_000  # +1%
    base, cur = _files(tmp_path, current)
    assert _run(capsys, "--baseline", base, "--current", cur)[0] == 1
    loose = ("--accuracy-drop", "0.03", "--speedup-drop", "0.2", "--macs-change", "0.02")
    code, out, _ = _run(capsys, "--baseline", base, "--current", cur, *loose)
    assert code == 0, out
    for i in range(0, len(loose), 2):  # tightening any one of them fails again
        tight = list(loose)
        tight[i + 1] = "0.001"
        assert _run(capsys, "--baseline", base, "--current", cur, *tight)[0] == 1, tight[i]


@pytest.mark.parametrize("argv", [[], ["--baseline", "a.csv"], ["--baseline", "a", "--current", "b", "--accuracy-drop", "-1"],
                                  ["--baseline", "a", "--current", "b", "--speedup-drop", "1.5"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err


def test_verbose_lists_ok_rows(tmp_path, capsys):
    base, cur = _files(tmp_path, _current())
    code, out, _ = _run(capsys, "--baseline", base, "--current", cur, "--verbose")
    assert code == 0 and "unpruned" in out and "query_rank1" in out
    assert "unpruned" not in format_findings(gate(base, cur, Tolerances()))


def test_empty_baseline_rows_fail_closed():
    assert not compare([], _current()).passed


def test_rows_from_read_csv_compare_like_dicts(tmp_path):
    base, cur = _files(tmp_path, _current())
    assert compare(read_csv(base).rows, read_csv(cur).rows).passed


@pytest.mark.parametrize("text,expected", [("", None), ("  ", None), ("nan", None), ("inf", None), ("abc", None),
                                           ("0.5", 0.5), ("3000000000", 3e9), (None, None), (2, 2.0)])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_both_cpus_are_printed_when_the_runs_come_from_different_cpus(tmp_path, capsys):
    current = _current()
    for row in current:
        row["device_name"] = "Intel(R) Xeon(R) Platinum"
    code, out, _ = _gate(tmp_path, capsys, current)
    assert code == 0, out
    assert "baseline made on: cpu, 2 threads" in out
    assert "current made on:  Intel(R) Xeon(R) Platinum, 2 threads" in out
    code, out, _ = _gate(tmp_path / "same", capsys, _current())
    assert code == 0 and "made on" not in out


def _with_interval(row: dict, low: float, high: float) -> dict:
    return {**row, "speedup_ci_low": low, "speedup_ci_high": high}


def test_with_intervals_a_lost_saving_fails_and_drift_within_the_noise_passes():
    base = [_with_interval(r, r["speedup"] - 0.02, r["speedup"] + 0.02) if r["speedup"] else r for r in BASELINE]
    drift = copy.deepcopy(base)
    _pick(drift, "heads50").update(speedup=1.37, speedup_ci_low=1.35, speedup_ci_high=1.39)  # 2% lower, overlapping
    assert compare(base, drift).passed
    lost = copy.deepcopy(base)
    _pick(lost, "tokens30").update(speedup=1.0, speedup_ci_low=0.99, speedup_ci_high=1.01)  # pruning bought nothing
    result = compare(base, lost)
    assert [(f.key[0], f.metric) for f in result.regressions] == [("tokens30", "speedup")]
    assert "interval [0.990, 1.010] below [1.230, 1.270]" in result.regressions[0].note
    small = copy.deepcopy(base)  # disjoint intervals but a 2% loss: within the floor, not a regression
    _pick(small, "heads50").update(speedup=1.372, speedup_ci_low=1.37, speedup_ci_high=1.375)
    assert compare(base, small, Tolerances(speedup_min_drop=0.03)).passed


@pytest.mark.parametrize("column, value", [("device_id", "jetson-orin"), ("threads", 4), ("input_size", "256x128"),
                                           ("backend", "onnxruntime")])
def test_runs_made_under_other_conditions_are_refused_unless_allowed(tmp_path, capsys, column, value):
    current = _current()
    for row in current:
        row[column] = value
    code, out, err = _gate(tmp_path, capsys, current)
    assert code == 2, out
    assert f"{column}: " in err and str(value) in err and "--allow-mismatch" in err
    code, out, _ = _gate(tmp_path / "allowed", capsys, current, "--allow-mismatch")
    assert "compared although the runs differ (--allow-mismatch)" in out
    # with other backends nothing matches: the baseline's configurations are missing, and it fails
    assert code == (1 if column == "backend" else 0), out


def test_a_column_blank_in_one_run_is_not_a_mismatch():
    older = [{**row, "threads": ""} for row in BASELINE]  # e.g. a CSV from before the column was filled
    assert compare(older, _current()).passed


def test_rows_timed_under_contention_are_flagged_but_still_compared(tmp_path, capsys):
    current = _current()
    _pick(current, "heads50")["other_cpu_share"] = 0.45
    _pick(current, "tokens30")["other_cpu_share"] = 0.02
    code, out, _ = _gate(tmp_path, capsys, current)
    assert code == 0, out
    assert "heads50/cpu/fp32/8: timed while other processes took 45% of the CPU" in out
    assert "tokens30/cpu/fp32/8: timed" not in out
