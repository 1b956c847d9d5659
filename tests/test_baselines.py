"""`amg baseline` and the choice of a run's baseline: one per CPU model, made from reruns,
refusing what is not reruns of one benchmark on one CPU (on CI's committed reruns)."""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import pytest

from amg.benchmark.results import ReportError, write_csv
from amg.benchmark.results_file import read_csv
from amg.cli import main
from amg.errors import InputError
from amg.reporting.baselines import choose, combine
from amg.reporting.gate import SpeedupRule

RUNS = Path(__file__).resolve().parents[1] / "results" / "baselines" / "ci-python-2core" / "runs"
AMD_RUNS = sorted((RUNS / "amd-epyc-2t").glob("*.csv"))
INTEL_RUNS = sorted((RUNS / "intel-r-xeon-r-processor-2t").glob("*.csv"))


def _edited(tmp_path: Path, run: Path, edit, name: str = "edited") -> Path:
    rows = copy.deepcopy(read_csv(run).rows)
    edit(rows)
    return write_csv(rows, tmp_path / name, "ci-python-2core", "run")


def test_a_baseline_keeps_the_reruns_median_and_an_interval_spanning_theirs():
    runs = [read_csv(path) for path in AMD_RUNS]
    combined = combine(runs)
    assert len(combined) == len(runs[0].rows)
    for index, row in enumerate(combined):
        reruns = [run.rows[index] for run in runs]
        assert row["config_id"] == reruns[0]["config_id"] and row["occluded_mAP"] == reruns[0]["occluded_mAP"]
        if not reruns[0]["speedup"]:
            assert not row["speedup"]  # the unpruned reference has none
            continue
        assert row["speedup"] == statistics.median(float(r["speedup"]) for r in reruns)
        assert row["speedup_ci_low"] == min(float(r["speedup_ci_low"]) for r in reruns)
        assert row["speedup_ci_high"] == max(float(r["speedup_ci_high"]) for r in reruns)
    assert combined[0]["run_id"] == "+".join(run.rows[0]["run_id"] for run in runs)


def test_amg_baseline_into_a_folder_names_the_file_after_the_cpu(tmp_path, capsys):
    assert main(["baseline", *map(str, INTEL_RUNS), "--into", str(tmp_path / "baselines")]) == 0
    written = tmp_path / "baselines" / "intel-r-xeon-r-processor-2t.csv"
    assert str(written) in capsys.readouterr().out
    assert read_csv(written).rows == read_csv(RUNS.parent / "intel-r-xeon-r-processor-2t.csv").rows  # CI's own


def _status(value: str):
    def edit(rows):
        for row in rows:
            row["run_status"] = value
    return edit


def _first_row(column: str, value: str):
    def edit(rows):
        rows[1][column] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_status("interrupted"), "interrupted run"),
    (_status(" Interrupted"), "none of complete, interrupted"),  # misspelt: refused when read
    (_first_row("occluded_rank1", "0.1"), "disagree on occluded_rank1"),
    (_first_row("macs", "1"), "disagree on macs"),
    (_first_row("device_name", "Other CPU"), "a baseline is one CPU model's"),
    (_first_row("threads", "1"), "a baseline is one CPU model's"),
    (_first_row("input_size", "64x32"), "conditions"),
    (lambda rows: rows.pop(), "other configurations"),
    (lambda rows: rows.append(dict(rows[1])), "two rows for"),
])
def test_what_is_not_a_rerun_of_one_benchmark_on_one_cpu_is_refused_naming_it(tmp_path, edit, message):
    bad = _edited(tmp_path, AMD_RUNS[1], edit)
    with pytest.raises(ReportError, match=message) as error:
        combine([read_csv(AMD_RUNS[0]), read_csv(bad)])
    assert str(bad) in str(error.value)


def test_one_run_is_not_a_baseline(capsys, tmp_path):
    with pytest.raises(InputError, match="at least 2 reruns"):
        combine([read_csv(AMD_RUNS[0])])
    assert main(["baseline", str(AMD_RUNS[0]), "--out", str(tmp_path / "b.csv")]) == 2
    assert "at least 2 reruns" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()


def test_one_run_given_twice_is_not_two_reruns(capsys, tmp_path):
    assert main(["baseline", str(AMD_RUNS[0]), str(AMD_RUNS[0]), "--out", str(tmp_path / "b.csv")]) == 2
    assert "are one run (20261128T134647Z-e3970d), not reruns" in capsys.readouterr().err


def test_runs_of_two_cpus_make_no_baseline(capsys, tmp_path):
    assert main(["baseline", str(AMD_RUNS[0]), str(INTEL_RUNS[0]), "--out", str(tmp_path / "b.csv")]) == 2
    err = capsys.readouterr().err
    assert "AMD EPYC" in err and "Intel(R) Xeon(R) Processor" in err


def test_a_folder_with_two_baselines_for_one_cpu_is_refused(tmp_path):
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_bytes(AMD_RUNS[0].read_bytes())
    with pytest.raises(ReportError, match="both baselines for AMD EPYC, 2 threads"):
        choose(tmp_path, read_csv(AMD_RUNS[1]))


def test_an_empty_baseline_folder_is_refused(tmp_path):
    with pytest.raises(ReportError, match="has no CSV baseline"):
        choose(tmp_path, read_csv(AMD_RUNS[1]))


def test_a_baseline_file_of_another_cpu_serves_for_accuracy_and_macs_only(tmp_path):
    choice = choose(AMD_RUNS[0], read_csv(INTEL_RUNS[0]))
    assert choice.rule is SpeedupRule.MACS_SHARE and choice.baseline.path == AMD_RUNS[0]
    assert choose(AMD_RUNS[0], read_csv(AMD_RUNS[1])).rule is SpeedupRule.SAME_CPU


def test_gate_help_explains_per_cpu_baselines(capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["gate", "--help"])
    assert exit_code.value.code == 0
    out = capsys.readouterr().out
    assert "same CPU model" in out and "--speedup-share" in out and "FILE|DIR" in out
