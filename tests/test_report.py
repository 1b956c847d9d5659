"""Tests for amg.reporting.report: loading, newest run per device, tables, Pareto fronts, the built report,
bad input, and concurrent writers (via amg.benchmark.results.write_csv)."""

from __future__ import annotations

import csv
import io
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from amg.benchmark.results import COLUMNS, ReportError, safe_name, write_csv
from amg.reporting.loading import load_reports, newest_per_configuration
from amg.reporting.pareto import pareto_front, plot_pareto
from amg.reporting.report import build_report
from amg.reporting.tables import cross_device_table, device_table

X86 = "x86_64-2c"
JETSON = "Jetson Orin/Nano (8GB)"  # safe_name turns it into a folder name
OLD_RUN, NEW_RUN, JETSON_RUN = "20261120T100000Z-aaaaaa", "20261125T140229Z-1a2b3c", "20261124T090000Z-bbbbbb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# config_id: (head ratio, token ratio, GMACs per image, parameters); ViT-Small at 256x128.
CONFIGS = {
    "unpruned": (0.0, 0.0, 4.60, 21_665_664),
    "heads=0.25,tokens=0": (0.25, 0.0, 3.98, 19_307_136),
    "heads=0.5,tokens=0.25": (0.5, 0.25, 2.71, 16_948_608),
}


def _row(device, run_id, timestamp, backend, config, batch, median_ms, speedup, **extra) -> dict:
    head, token, gmacs, params = CONFIGS[config]
    row = {
        "run_id": run_id,
        "timestamp": timestamp,
        "device_id": device,
        "device_name": "NVIDIA Orin" if "Jetson" in device else "AMD EPYC 7B13",
        "backend": backend,
        "precision": "fp32",
        "threads": 2,
        "batch": batch,
        "model": "vit_small",
        "checkpoint": "default",
        "input_size": "256x128",
        "config_id": config,
        "head_policy": "amg",
        "token_policy": "amg",
        "allocation": "global",
        "schedule": "one-shot",
        "head_ratio": head,
        "token_ratio": token,
        "params": params,
        "macs": round(gmacs * 1e9),
        "gmacs": gmacs,
        "macs_saving": 1 - gmacs / 4.60,
        "latency_median_ms": median_ms,
        "latency_p90_ms": median_ms * 1.08,
        "latency_rounds": 30,
        "speedup": speedup,
        "latency_saving": 1 - 1 / speedup,
        "peak_rss_mb": 412.0,
        "dataset": "occluded_duke",
        "query_rank1": 0.871 - 0.04 * head - 0.03 * token,
        "query_mAP": 0.702 - 0.04 * head - 0.03 * token,
        "occluded_rank1": 0.612 - 0.04 * head - 0.03 * token,
        "occluded_mAP": 0.511 - 0.04 * head - 0.03 * token,
        "amg_version": "0.1.0",
        "torch_version": "2.5.1",
        "python_version": "3.11.7",
        "os": "Linux",
        "git_revision": "d024c9a",
    }
    row.update(extra)
    return row


def _x86_run(run_id, timestamp, speedups) -> list[dict]:
    rows = []
    for batch, base in ((1, 38.4), (32, 820.0)):
        for config, speedup in zip(CONFIGS, speedups):
            rows.append(_row(X86, run_id, timestamp, "cpu", config, batch, base / speedup, speedup))
    return rows


def _jetson_run() -> list[dict]:
    rows = [
        _row(JETSON, JETSON_RUN, "2026-11-24T09:00:00Z", "jetson", config, 1, 12.0 / speedup, speedup)
        for config, speedup in zip(CONFIGS, (1.0, 1.05, 1.41))
    ]
    rows[2]["peak_rss_mb"] = None  # not measured on this board: shown as "—"
    return rows


@pytest.fixture()
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    # 13:00 UTC, before the new run's 14:02 UTC, though its text sorts after it: times are parsed.
    write_csv(_x86_run(OLD_RUN, "2026-11-25T15:00:00+02:00", (1.0, 1.01, 1.02)), root, X86, OLD_RUN)
    write_csv(_x86_run(NEW_RUN, "2026-11-25T14:02:29Z", (1.0, 1.234, 1.876)), root, X86, NEW_RUN)
    write_csv(_jetson_run(), root, JETSON, JETSON_RUN)
    return root


# ----------------------------------------------------------------------------- loading


def test_load_reports_combines_files_and_converts_numbers(results):
    frame = load_reports(results)
    assert len(frame) == 6 + 6 + 3
    assert set(frame["device_id"]) == {X86, JETSON}
    assert frame["source"].nunique() == 3
    jetson_file = results / safe_name(JETSON) / f"{JETSON_RUN}.csv"
    assert (frame["source"] == str(jetson_file)).sum() == 3
    for column in ("batch", "speedup", "latency_median_ms", "gmacs", "occluded_rank1", "macs"):
        assert pd.api.types.is_numeric_dtype(frame[column]), column
    assert frame["batch"].tolist().count(32) == 6
    assert frame["macs"].max() == 4_600_000_000
    assert frame["peak_rss_mb"].isna().sum() == 1  # the empty cell, as NaN
    assert list(frame.columns[: len(COLUMNS)]) == COLUMNS


def test_load_reports_takes_a_list_of_files(results):
    jetson = results / safe_name(JETSON) / f"{JETSON_RUN}.csv"
    frame = load_reports([jetson])
    assert set(frame["run_id"]) == {JETSON_RUN}


def test_newest_per_configuration_keeps_the_newest_run(results):
    latest = newest_per_configuration(load_reports(results))
    assert set(zip(latest["device_id"], latest["run_id"])) == {(X86, NEW_RUN), (JETSON, JETSON_RUN)}
    assert len(latest) == 9


def test_newest_per_configuration_orders_by_time_then_run_id():
    base = {"model": "m", "checkpoint": "c", "config_id": "unpruned", "backend": "cpu", "precision": "fp32",
            "batch": 1}
    frame = pd.DataFrame(
        {
            "device_id": ["d", "d", "d", "e", "e"],
            "run_id": ["run-b", "run-a", "run-0", "run-z", "run-a"],
            "timestamp": [
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:00:00Z",  # same instant as run-b: the larger run id wins
                "",  # no timestamp: oldest
                "2026-01-01T00:00:00Z",
                "2026-01-02T00:00:00Z",  # later, though its run id sorts first
            ],
        }
    ).assign(**base)
    latest = newest_per_configuration(frame)
    assert sorted(zip(latest["device_id"], latest["run_id"])) == [("d", "run-b"), ("e", "run-a")]


def test_runs_of_different_configurations_add_up(results):
    """A study run measuring other configurations does not hide the previous run's rows."""
    study = [_row(X86, "20261126T000000Z-cccccc", "2026-11-26T00:00:00Z", "cpu", "unpruned", 1, 37.0, 1.0,
                  config_id="save0.3:heads:amg+tokens:amg")]
    write_csv(study, results, X86, "20261126T000000Z-cccccc")
    latest = newest_per_configuration(load_reports(results))
    x86 = latest[latest["device_id"] == X86]
    assert len(x86) == 7  # the new run's one configuration + the 6 rows of the newest earlier run
    assert set(x86["run_id"]) == {NEW_RUN, "20261126T000000Z-cccccc"}


# ----------------------------------------------------------------------------- tables


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_device_table_formats_values_and_puts_unpruned_first(results):
    rows = _table_rows(device_table(load_reports(results), X86))
    header, body = rows[0], rows[2:]  # rows[1] is the |---| rule
    assert header[:3] == ["config", "backend", "batch"]
    assert "speed-up" in header and "occluded R1 %" in header
    assert len(body) == 6  # newest run only: 3 configurations x 2 batches
    col = {name: i for i, name in enumerate(header)}
    assert [r[col["config"]] for r in body] == list(CONFIGS) * 2  # unpruned first in each batch
    assert [r[col["batch"]] for r in body] == ["1"] * 3 + ["32"] * 3
    heads = body[1]
    assert heads[col["speed-up"]] == "1.23"  # 1.234
    assert heads[col["latency saved %"]] == "19.0"  # 1 - 1/1.234
    assert heads[col["MACs saved %"]] == "13.5"  # 1 - 3.98/4.60
    assert heads[col["GMACs"]] == "3.98"
    assert heads[col["params (M)"]] == "19.31"  # 19_307_136
    assert heads[col["median ms"]] == "31.12"  # 38.4 / 1.234
    assert heads[col["occluded R1 %"]] == "60.2"  # 0.612 - 0.01
    assert heads[col["holistic mAP %"]] == "69.2"  # 0.702 - 0.01


def test_device_table_shows_a_dash_for_missing_values(results):
    rows = _table_rows(device_table(load_reports(results), JETSON))
    col = {name: i for i, name in enumerate(rows[0])}
    assert [r[col["peak RSS MB"]] for r in rows[2:]] == ["412", "412", "—"]


def test_device_table_of_an_unknown_device_is_an_error(results):
    with pytest.raises(ReportError, match="no-such-board"):
        device_table(load_reports(results), "no-such-board")


def test_cross_device_table_has_one_speedup_column_per_device_backend(results):
    rows = _table_rows(cross_device_table(load_reports(results)))
    header, body = rows[0], rows[2:]
    assert header == ["model", "config", "batch", "MACs saved %", f"{JETSON}/jetson", f"{X86}/cpu"]
    assert [r[1:3] for r in body] == [
        ["unpruned", "1"],
        ["unpruned", "32"],
        ["heads=0.25,tokens=0", "1"],
        ["heads=0.25,tokens=0", "32"],
        ["heads=0.5,tokens=0.25", "1"],
        ["heads=0.5,tokens=0.25", "32"],
    ]
    assert body[2][4:] == ["1.05", "1.23"]  # newest x86 run: 1.234, not the old 1.01
    assert body[5][4:] == ["—", "1.88"]  # no batch 32 on the Jetson
    assert body[4][3] == "41.1"  # 1 - 2.71/4.60


# ----------------------------------------------------------------------------- Pareto


def test_pareto_front_returns_exactly_the_non_dominated_rows():
    frame = pd.DataFrame(
        {
            "name": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "latency_median_ms": [10.0, 8.0, 8.0, 12.0, 5.0, np.nan, 5.0, 20.0],
            "occluded_rank1": [0.60, 0.58, 0.55, 0.59, 0.40, 0.99, 0.40, 0.61],
        }
    )
    # c: b is as fast and more accurate. d: a is faster and more accurate. f: NaN.
    # e and g are equal: neither dominates the other. h is slowest but most accurate.
    front = pareto_front(frame, "latency_median_ms", "occluded_rank1")
    assert sorted(front["name"]) == ["a", "b", "e", "g", "h"]
    assert front["latency_median_ms"].is_monotonic_increasing


def test_pareto_front_rejects_an_unknown_column():
    with pytest.raises(ValueError, match="latency_ms"):
        pareto_front(pd.DataFrame({"a": [1.0]}), "latency_ms", "a")


# ----------------------------------------------------------------------------- the report


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 1000, path


def test_build_report_writes_readme_and_two_pngs(results, tmp_path):
    out = tmp_path / "report"
    paths = build_report(results, out)
    assert [p.name for p in paths] == ["README.md", "accuracy_vs_latency.png", "accuracy_vs_gmacs.png"]
    for png in paths[1:]:
        _assert_png(png)
    text = paths[0].read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert f"## {X86}" in text and f"## {JETSON}" in text
    assert NEW_RUN in text and JETSON_RUN in text and OLD_RUN not in text  # newest runs only
    assert "3 CSV file(s)" in text
    assert "1.23" in text and "accuracy_vs_latency.png" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files left


def test_plot_pareto_without_any_accuracy_still_writes_a_png(results, tmp_path):
    frame = load_reports(results).assign(occluded_rank1=np.nan)
    _assert_png(plot_pareto(frame, tmp_path, "latency_median_ms", "occluded_rank1", "empty.png"))


# ----------------------------------------------------------------------------- bad input


def _good_csv(tmp_path) -> Path:
    return write_csv(_jetson_run(), tmp_path / "results", JETSON, JETSON_RUN)


def test_corrupted_csv_is_an_error_naming_the_file(results):
    bad = results / X86 / "garbage.csv"
    bad.write_bytes(b"\x89\xff\xfe\x00\x13garbage\x80\x81,\x00\n" * 20)
    with pytest.raises(ReportError, match="garbage.csv"):
        load_reports(results)


def test_huge_unbalanced_quote_is_a_report_error_not_a_csv_error(results):
    # Text that decodes but that the csv module rejects (a field past its size limit).
    bad = results / X86 / "quote.csv"
    bad.write_text('"' + "x" * 200_000 + "\n")
    with pytest.raises(ReportError, match="quote.csv"):
        load_reports(results)


def test_truncated_csv_is_an_error_naming_the_file(tmp_path):
    path = _good_csv(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # cut in the middle of the last line
    with pytest.raises(ReportError, match="truncated") as info:
        load_reports(path)
    assert str(path) in str(info.value)


def test_csv_missing_a_column_is_an_error_naming_the_file_and_column(tmp_path):
    path = _good_csv(tmp_path)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [c for c in COLUMNS if c != "speedup"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())
    with pytest.raises(ReportError, match="speedup") as info:
        load_reports([path])
    assert str(path) in str(info.value)


def test_non_number_in_a_numeric_column_is_an_error_naming_the_file(tmp_path):
    path = _good_csv(tmp_path)
    path.write_text(path.read_text().replace("412", "lots", 1))
    with pytest.raises(ReportError, match="line 2: peak_rss_mb 'lots' is not a number") as info:
        load_reports(path)
    assert str(path) in str(info.value)


def test_empty_results_folder_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "results"
    (empty / X86).mkdir(parents=True)
    with pytest.raises(ReportError, match="no results CSV") as info:
        build_report(empty, tmp_path / "out")
    assert str(empty) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_results_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(ReportError, match="results folder not found: .*nowhere"):
        build_report(tmp_path / "nowhere", tmp_path / "out")


# ----------------------------------------------------------------------------- concurrent writers


def _write_together(root: Path, run_ids: list[str]) -> list:
    """One thread per run id, released at once by a barrier; returns each one's path or error."""
    barrier = threading.Barrier(len(run_ids))
    outcome: list = [None] * len(run_ids)

    def write(index: int, run_id: str) -> None:
        rows = _x86_run(run_id, "2026-11-25T14:02:29Z", (1.0, 1.1 + index, 1.5))
        barrier.wait()
        try:
            outcome[index] = write_csv(rows, root, X86, run_id)
        except ReportError as error:
            outcome[index] = error

    threads = [threading.Thread(target=write, args=(i, r)) for i, r in enumerate(run_ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


def test_two_writers_at_once_both_land_whole(tmp_path):
    root = tmp_path / "results"
    for attempt in range(10):  # repeated: a race shows up only sometimes
        outcome = _write_together(root, [f"run-{attempt}-a", f"run-{attempt}-b"])
        assert all(isinstance(o, Path) for o in outcome), outcome
    frame = load_reports(root)
    assert frame["run_id"].nunique() == 20
    assert frame.groupby("run_id").size().eq(6).all()  # every file complete
    assert sorted(p.name for p in (root / X86).iterdir() if not p.name.endswith(".csv")) == []  # no temp files


def test_two_writers_of_the_same_run_one_wins_one_is_refused(tmp_path):
    root = tmp_path / "results"
    outcome = _write_together(root, ["same-run", "same-run"])
    assert sum(isinstance(o, Path) for o in outcome) == 1
    assert sum(isinstance(o, ReportError) for o in outcome) == 1
    assert [p.name for p in (root / X86).iterdir()] == ["same-run.csv"]
    frame = load_reports(root)
    assert len(frame) == 6
    heads = frame[frame["config_id"] == "heads=0.25,tokens=0"]
    assert heads["speedup"].nunique() == 1  # all rows from one writer, none mixed in from the other


def test_the_report_opens_with_the_best_configuration_per_saving():
    import pandas as pd

    from amg.reporting.summary import summary_table

    def row(config, saving, mAP, speedup=None, low=None, high=None):
        return {"device_id": "dev", "backend": "cpu", "precision": "fp32", "batch": 1, "config_id": config,
                "head_ratio": 0.0 if config == "unpruned" else 0.5, "token_ratio": 0.0, "macs_saving": saving,
                "occluded_mAP": mAP, "speedup": speedup, "speedup_ci_low": low, "speedup_ci_high": high,
                "latency_median_ms": 1.0}

    frame = pd.DataFrame([row("unpruned", 0.0, 0.40), row("heads0.25:amg", 0.12, 0.36, 1.10, 1.08, 1.12),
                          row("heads0.25:random", 0.12, 0.30, 1.12), row("heads0.5:amg", 0.19, 0.20, 1.30)])
    metric, table = summary_table(frame)
    assert metric == "occluded_mAP"
    lines = [line for line in table.splitlines() if line.startswith("| dev ")]
    assert "heads0.25:amg " in lines[0] and "1.10 [1.08, 1.12]" in lines[0] and "90%" in lines[0]
    assert "heads0.5:amg" in lines[1] and "50%" in lines[1]  # 19% counts as 20% (within 2 points)
    assert "out of reach here" in lines[2]
    assert summary_table(frame.assign(occluded_mAP=None)) is None  # latency-only runs: no summary


@pytest.mark.parametrize("config_id, family", [
    ("unpruned", "unpruned"), ("unpruned@ft300", "unpruned"), ("heads0.25:amg", "heads"),
    ("save0.2:heads:amg/keep-one@ft300", "heads"), ("tokens0.5:random", "tokens"),
    ("heads0.5:amg+tokens0.5:amg", "heads+tokens"), ("save0.3:tokens:tome", "ToMe / EViT"), ("made-up", "other")])
def test_policy_families_colour_the_plots(config_id, family):
    from amg.reporting.pareto import policy_family

    assert policy_family(config_id) == family


def test_only_the_pareto_front_is_labelled():
    import pandas as pd
    from matplotlib.figure import Figure

    from amg.reporting.pareto import _draw_series

    frame = pd.DataFrame({"config_id": ["unpruned", "heads0.25:amg", "heads0.25:random", "tokens0.5:tome", "a"],
                          "latency_median_ms": [4.0, 3.0, 3.2, 5.0, 6.0], "occluded_mAP": [0.4, 0.35, 0.3, 0.39, 0.1]})
    ax = Figure().add_subplot()
    _draw_series(ax, frame, "latency_median_ms", "occluded_mAP")
    assert sorted(text.get_text() for text in ax.texts) == ["heads0.25:amg", "unpruned"]


# ----------------------------------------------------------------------------- runtimes and precision


def _runtime_rows() -> list[dict]:
    """ViT-Small on two runtimes at fp32 and OpenVINO at int8 (speed-ups over unpruned fp32)."""
    rows = []
    for backend, base in (("onnxruntime", 35.0), ("openvino", 30.0)):
        for config, speedup in zip(CONFIGS, (1.0, 1.10, 1.50)):
            extra = {} if config == "unpruned" else {"speedup_ci_low": speedup - 0.02, "speedup_ci_high": speedup + 0.02}
            rows.append(_row(X86, NEW_RUN, "2026-11-25T14:02:29Z", backend, config, 1, base / speedup, speedup,
                             accuracy_of="pytorch fp32", **extra))
    for config, fp32_speedup, mAP in zip(CONFIGS, (1.60, 1.75, 2.30), (0.50, 0.48, 0.45)):
        rows.append(_row(X86, NEW_RUN, "2026-11-25T14:02:29Z", "openvino", config, 1, 30.0 / fp32_speedup, 1.0,
                         precision="int8", fp32_speedup=fp32_speedup, fp32_speedup_ci_low=fp32_speedup - 0.03,
                         fp32_speedup_ci_high=fp32_speedup + 0.03, accuracy_of="openvino int8", occluded_mAP=mAP))
    return rows


def test_the_fastest_runtime_and_its_saving_ratio_per_configuration(tmp_path):
    from amg.reporting.runtimes import runtime_tables, saving_ratio

    write_csv(_runtime_rows(), tmp_path, X86, NEW_RUN)
    latest = newest_per_configuration(load_reports(tmp_path))
    ((title, table),) = runtime_tables(latest)
    assert title == f"{X86} · vit_small · batch 1"
    lines = table.splitlines()
    assert "onnxruntime ms" in lines[0] and "openvino ms" in lines[0] and "fastest" in lines[0]
    unpruned, quarter, half = lines[2:5]
    assert unpruned.split("|")[1].strip() == "unpruned" and "openvino" in unpruned
    # heads 0.5 + tokens 0.25: 41.1% of MACs saved, speed-up 1.50 (latency saved 33.3%) on OpenVINO
    expected = saving_ratio(1.50, 1 - 2.71 / 4.60)
    assert f"{expected:.2f} [{saving_ratio(1.48, 1 - 2.71 / 4.60):.2f}, {saving_ratio(1.52, 1 - 2.71 / 4.60):.2f}]" in half
    assert saving_ratio(1.0, 0.0) != saving_ratio(1.0, 0.0)  # no MACs saved: no ratio (NaN)


def test_pruning_vs_int8_vs_both_compares_against_unpruned_fp32(tmp_path):
    from amg.reporting.precision import precision_tables

    write_csv(_runtime_rows(), tmp_path, X86, NEW_RUN)
    latest = newest_per_configuration(load_reports(tmp_path))
    ((title, table),) = precision_tables(latest)  # only OpenVINO has reduced-precision rows
    assert title == f"{X86} · vit_small · openvino · batch 1"
    body = [line for line in table.splitlines()[2:]]
    assert "1.00 (reference)" in body[0] and "fp32" in body[0]
    assert "1.60 [1.57, 1.63]" in body[1] and "openvino int8" in body[1]  # INT8 alone
    assert any("1.50 [1.48, 1.52]" in line and "fp32" in line for line in body)  # pruning alone
    assert any("2.30 [2.27, 2.33]" in line and "45.0" in line for line in body)  # both, with the int8 accuracy
    report = build_report(tmp_path, tmp_path / "report")[0].read_text()
    assert "## Fastest runtime" in report and "## Pruning vs reduced precision" in report
