"""A benchmark run stopped for real keeps what it measured and leaves no process behind.

A short `pytest bench/` (a tiny model on a tiny synthetic set, three configurations) is
stopped at a random moment after its first row is in the journal: SIGINT and SIGTERM write
an interrupted CSV of the rows so far; SIGKILL leaves the journal, which the next run turns
into that report. (A run that finished before the signal wrote a complete report.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import TINY_DATA

from amg.benchmark.query_record import load_query_record
from amg.benchmark.journals import append_journal, claim_journal, journal_path, queries_journal, recover_journals
from amg.benchmark.results import COMPLETE, INTERRUPTED, find_csvs
from amg.benchmark.results_file import read_csv
from amg.data.synthetic import generate
from amg.model.pruned import save_pruned
from amg.model.vit import build_model
from amg.reporting.gate_cli import main as gate_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    generate(folder / "synth", TINY_DATA)
    model = build_model("small", img_size=(TINY_DATA.height, TINY_DATA.width), num_classes=6).eval()
    return save_pruned(model, folder / "tiny.pt"), folder / "synth"


def _start_bench(tiny_inputs, results: Path) -> subprocess.Popen:
    model, data = tiny_inputs
    command = [sys.executable, "-m", "pytest", "bench/test_suite.py", "-q", "-p", "no:cacheprovider",
               "--amg-profile", "quick", "--amg-checkpoint", str(model), "--amg-data", str(data),
               "--amg-policies", "random", "--amg-threads", "1", f"--amg-results-dir={results}"]
    env = {**os.environ, "AMG_DEVICE_ID": "fault-test"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_a_row(process: subprocess.Popen, results: Path) -> None:
    """Until the first measured row is on disk, then a random moment more (up to 3 s)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        journals = list(results.glob("*/.*.journal"))
        if journals and journals[0].read_text().strip():
            time.sleep(random.uniform(0.0, 3.0))
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    raise AssertionError("the run measured nothing in time")


def _descendants(process: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def _assert_gone(processes: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"left behind: {[(p.pid, p.cmdline()[:3]) for p in alive]}")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_writes_what_it_measured_marked_interrupted(tiny_inputs, tmp_path, stop):
    results = tmp_path / "results"
    process = _start_bench(tiny_inputs, results)
    _wait_for_a_row(process, results)
    children = _descendants(process)
    process.send_signal(stop)
    output, _ = process.communicate(timeout=120)
    [report] = find_csvs(results)
    rows = read_csv(report).rows
    expected = COMPLETE if process.returncode == 0 else INTERRUPTED  # 0: it had finished first
    assert rows and all(row["run_status"] == expected for row in rows), output
    assert not list(results.glob("*/.*.journal"))  # the report holds them now
    # and each measured configuration's per-query accuracy, for paired comparisons
    record = load_query_record(report)
    assert {row["config_id"] for row in rows} <= set(record)
    assert all(len(values["occluded"]["ap"]) == len(values["occluded"]["rank1"]) > 0 for values in record.values())
    if expected == INTERRUPTED:
        assert gate_main(["--baseline", str(report), "--current", str(report)]) == 2  # never a baseline
    _assert_gone(children)


def test_a_killed_runs_rows_come_back_as_an_interrupted_report(tiny_inputs, tmp_path):
    results = tmp_path / "results"
    process = _start_bench(tiny_inputs, results)
    _wait_for_a_row(process, results)
    assert not recover_journals(results)  # a second run starting now leaves the live run's journal alone
    children = _descendants(process)
    process.kill()
    process.communicate(timeout=60)
    _assert_gone(children)
    if process.returncode == 0:  # it had finished before the kill
        assert find_csvs(results) and not recover_journals(results)
        return
    assert not find_csvs(results)  # nothing was written at exit...
    [report] = recover_journals(results)  # ...but every measured row is in the journal
    rows = read_csv(report).rows
    assert rows and {row["run_status"] for row in rows} == {INTERRUPTED}
    assert not list(results.glob("*/.*.journal"))
    # and their per-query values, for the report's paired intervals
    assert {row["config_id"] for row in rows} <= set(load_query_record(report))
    assert not list(results.glob("*/.*.journal.queries"))


def test_a_live_runs_journal_is_not_recovered_by_another_run(tmp_path):
    """Two `pytest bench/` on one results folder: the second one's start must not turn the first
    one's journal into a report (the first would then fail to write its own)."""
    journal = journal_path(tmp_path, "device", "run-1")
    handle = claim_journal(journal)
    append_journal(journal, {"config_id": "unpruned", "backend": "cpu", "precision": "fp32", "batch": 1,
                             "device_id": "device", "run_id": "run-1"})
    assert recover_journals(tmp_path) == [] and journal.is_file()
    handle.close()  # the run died: its lock went with it
    [report] = recover_journals(tmp_path)
    assert report.name == "run-1.csv" and not journal.exists()


def test_a_killed_runs_per_query_values_come_back_with_its_rows(tmp_path):
    journal = journal_path(tmp_path, "device", "run-1")
    append_journal(journal, {"config_id": "unpruned", "backend": "cpu", "precision": "fp32", "batch": 1,
                             "device_id": "device", "run_id": "run-1"})
    values = {"occluded": {"ap": [0.5, 1.0], "rank1": [0, 1]}}
    append_journal(queries_journal(journal), {"unpruned": values})
    with open(queries_journal(journal), "a") as torn:
        torn.write('{"heads0.5:amg": {"occl')  # the line being written at the kill
    [report] = recover_journals(tmp_path)
    assert load_query_record(report) == {"unpruned": values}
    assert not journal.exists() and not queries_journal(journal).exists()


@pytest.mark.parametrize("line", [
    '["a", "list"]',  # JSON, but not a row
    '{"config_id": "unpruned", "no_such_column": 1}',
    '{"config_id": "unpruned", "backend": "cpu", "precision": "fp32", "batch": 1, "device_id": "d", '
    '"run_id": "run-2", "occluded_mAP": 85}',  # percent, not a fraction
])
def test_a_damaged_journal_is_set_aside_with_a_warning_and_the_others_still_recovered(tmp_path, line):
    good = journal_path(tmp_path, "device", "run-1")
    append_journal(good, {"config_id": "unpruned", "backend": "cpu", "precision": "fp32", "batch": 1,
                          "device_id": "device", "run_id": "run-1"})
    damaged = journal_path(tmp_path, "device", "run-2")
    damaged.write_text(line + "\n")
    warnings = []
    [report] = recover_journals(tmp_path, warnings.append)
    assert report.name == "run-1.csv"
    aside = damaged.with_name(damaged.name + ".damaged")
    assert aside.is_file() and not damaged.exists()
    assert len(warnings) == 1 and str(aside) in warnings[0]
    assert recover_journals(tmp_path, warnings.append) == [] and len(warnings) == 1  # said once


def test_an_interrupt_that_surfaces_as_another_error_still_stops_the_run():
    """Ctrl-C inside torch.save's zip writer comes out as a RuntimeError: the flag set by the
    handler stops the run at the next test all the same (and marks the report interrupted)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_conftest_under_test", ROOT / "bench" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    conftest.pytest_runtest_setup(None)  # nothing happened yet: the next test runs
    with pytest.raises(KeyboardInterrupt, match="signal 2"):
        conftest._interrupt(signal.SIGINT, None)
    assert conftest._INTERRUPTED.is_set()
    with pytest.raises(KeyboardInterrupt, match="interrupted earlier"):
        conftest.pytest_runtest_setup(None)
