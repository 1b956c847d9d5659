"""Benchmark CSV reports -> Markdown tables (pandas, tabulate) and Pareto plots (matplotlib).

Input is the CSVs of `amg.benchmark.results` (`results/<device-id>/<run-id>.csv`), read through
`amg.benchmark.results.read_csv`, so a missing, truncated or off-schema file fails here too, with its
name. `build_report` is what `amg report` calls: each configuration's newest measurement on
each device goes into one section of `README.md` per device, a cross-device speed-up table,
two accuracy-vs-cost plots, the equal-MACs comparison (amg.reporting.equal_macs) and the attention
pictures (amg.reporting.pictures).

Plots use `matplotlib.figure.Figure` directly instead of pyplot: no display is needed, no
global backend is switched for whoever imports this module, and no figure is left open.
"""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tabulate import tabulate

from amg.benchmark.profiles import UNPRUNED
from amg.benchmark.results import (
    COLUMNS,
    MEASURE_COLUMNS,
    ReportError,
    ResultsFile,
    find_csvs,
    read_csv,
    write_atomic,
)
from amg.errors import InputError

__all__ = [
    "ReportError",
    "load_reports",
    "newest_per_configuration",
    "device_table",
    "cross_device_table",
    "pareto_front",
    "plot_pareto",
    "build_report",
]

MISSING = "—"  # shown for a value that was not measured
NUMERIC_COLUMNS = ["threads", "batch", "head_ratio", "token_ratio"] + [c for c in MEASURE_COLUMNS if c != "dataset"]
# Stored as fractions (0..1); tables and plots show them in percent.
PERCENT_COLUMNS = {"macs_saving", "latency_saving"} | {
    c for c in MEASURE_COLUMNS if c.startswith(("query_", "occluded_"))
}
AXIS_LABELS = {
    "latency_median_ms": "median latency (ms)",
    "latency_p90_ms": "p90 latency (ms)",
    "gmacs": "GMACs per image",
    "params": "parameters",
    "speedup": "speed-up over unpruned (×)",
    "peak_rss_mb": "peak RSS (MB)",
    "query_rank1": "holistic Rank-1 (%)",
    "query_mAP": "holistic mAP (%)",
    "occluded_rank1": "occluded Rank-1 (%)",
    "occluded_mAP": "occluded mAP (%)",
}
# (header, column, decimals, scale) for one device's table.
DEVICE_COLUMNS = (
    ("params (M)", "params", 2, 1e-6),
    ("GMACs", "gmacs", 2, 1.0),
    ("MACs saved %", "macs_saving", 1, 100.0),
    ("median ms", "latency_median_ms", 2, 1.0),
    ("p90 ms", "latency_p90_ms", 2, 1.0),
    ("speed-up", "speedup", 2, 1.0),
    ("latency saved %", "latency_saving", 1, 100.0),
    ("peak RSS MB", "peak_rss_mb", 0, 1.0),
    ("holistic R1 %", "query_rank1", 1, 100.0),
    ("holistic mAP %", "query_mAP", 1, 100.0),
    ("occluded R1 %", "occluded_rank1", 1, 100.0),
    ("occluded mAP %", "occluded_mAP", 1, 100.0),
)
LATENCY_PLOT = "accuracy_vs_latency.png"
MACS_PLOT = "accuracy_vs_gmacs.png"


# ----------------------------------------------------------------------------- loading


def _csvs_under(root: Path) -> list[Path]:
    paths = find_csvs(root)  # raises, naming the folder, when it does not exist
    if not paths:
        raise ReportError(f"no results CSV found under {root} (expected {root}/<device-id>/<run-id>.csv)")
    return paths


def _paths(paths_or_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths_or_dir, (str, Path)):
        path = Path(paths_or_dir)
        # Not a folder: one file, which read_csv reports if it is missing.
        return _csvs_under(path) if path.is_dir() else [path]
    paths = [Path(p) for p in paths_or_dir]
    if not paths:
        raise ReportError("no results files given")
    return paths


def _first_non_number(values: pd.Series) -> tuple[int, object] | None:
    """(line, text) of the first value that is not a number; the header is line 1."""
    for offset, value in enumerate(values):
        try:
            float(value)
        except (TypeError, ValueError):
            return offset + 2, value
    return None


def _numeric(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Numeric columns as floats/ints (empty -> NaN); a non-number is an error naming the file."""
    for column in NUMERIC_COLUMNS:
        raw = frame[column].astype(object).where(frame[column] != "", np.nan)
        bad = _first_non_number(raw)
        if bad:
            raise ReportError(f"{path} line {bad[0]}: {column} {bad[1]!r} is not a number")
        frame[column] = pd.to_numeric(raw)
    return frame


def _read(path: Path) -> ResultsFile:
    try:
        return read_csv(path)
    except csv.Error as error:  # read_csv lets the csv module's own errors through
        raise ReportError(f"{path} is not a readable CSV: {error}") from error


def load_reports(paths_or_dir: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """All rows of the given CSVs (or of every CSV under a results folder) as one frame.

    Each file goes through `read_csv`, so a bad one raises `ReportError` naming it. Numeric
    columns are numbers (empty -> NaN); the other columns stay text. `source` is the file.
    """
    frames = []
    for path in _paths(paths_or_dir):
        results = _read(path)
        frame = _numeric(pd.DataFrame(results.rows, dtype=object), results.path)
        frames.append(frame.assign(source=str(results.path)))
    frame = pd.concat(frames, ignore_index=True)
    extra = [c for c in frame.columns if c not in COLUMNS and c != "source"]
    return frame[COLUMNS + extra + ["source"]]


def run_timestamps(frame: pd.DataFrame) -> pd.Series:
    # Parsed rather than compared as text: "…Z" and "…+00:00" spell the same instant.
    return pd.to_datetime(frame["timestamp"], utc=True, errors="coerce", format="ISO8601")


CONFIGURATION_KEY = ["device_id", "model", "checkpoint", "config_id", "backend", "precision", "batch"]


def newest_per_configuration(frame: pd.DataFrame) -> pd.DataFrame:
    """Each configuration's row from the newest run of its device that measured it.

    A device's runs of different profiles (the default suite, the equal-MACs study) thus
    add up, while a rerun replaces what it measured again. Speed-ups stay within their run.
    """
    if frame.empty:
        return frame
    ordered = frame.assign(_time=run_timestamps(frame)).sort_values(["_time", "run_id"], na_position="first",
                                                                    kind="stable")
    return ordered.groupby(CONFIGURATION_KEY, sort=False, dropna=False).tail(1).drop(columns="_time").sort_index()


# ----------------------------------------------------------------------------- tables


def format_cell(value: object, decimals: int, scale: float = 1.0) -> str:
    if value is None or pd.isna(value):
        return MISSING
    return f"{float(value) * scale:.{decimals}f}"


def _markdown_text(text: object) -> str:
    # A "|" inside a cell would end it early in Markdown.
    return str(text).replace("|", "\\|")


def _is_unpruned(frame: pd.DataFrame) -> pd.Series:
    # By name, or by ratios both 0 for configurations named otherwise (e.g. "heads=0,tokens=0").
    named = frame["config_id"].astype(str).str.lower() == UNPRUNED.config_id
    return named | ((frame["head_ratio"] == 0) & (frame["token_ratio"] == 0))


def _unpruned_first(frame: pd.DataFrame, groups: list[str]) -> pd.DataFrame:
    """Sorted by `groups`, then the unpruned configuration, then the others by name."""
    order = frame.assign(_pruned=~_is_unpruned(frame))
    return order.sort_values(groups + ["_pruned", "config_id"], kind="stable").drop(columns="_pruned")


def _markdown(rows: list[list[str]], headers: list[str], numeric_from: int) -> str:
    # disable_numparse: tabulate would otherwise re-format "1.20" as "1.2".
    align = ["left"] * numeric_from + ["right"] * (len(headers) - numeric_from)
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True, colalign=align)


def device_table(frame: pd.DataFrame, device_id: str) -> str:
    """Markdown table of one device's newest measurements: one row per model/config/backend/precision/batch.

    Within each backend and batch the unpruned configuration comes first (speed-ups are
    relative to it). `model` and `precision` columns appear only when they vary.
    """
    rows = newest_per_configuration(frame[frame["device_id"] == device_id])
    if rows.empty:
        raise ReportError(f"no rows for device {device_id!r}")
    varying = [c for c in ("model", "precision") if rows[c].nunique() > 1]
    rows = _unpruned_first(rows, ["model", "backend", "precision", "batch"])
    labels = varying + ["config", "backend", "batch"]
    headers = labels + [header for header, *_ in DEVICE_COLUMNS]
    body = [
        [_markdown_text(row[c]) for c in varying]
        + [_markdown_text(row["config_id"]), _markdown_text(row["backend"]), format_cell(row["batch"], 0)]
        + [format_cell(row[column], decimals, scale) for _, column, decimals, scale in DEVICE_COLUMNS]
        for _, row in rows.iterrows()
    ]
    return _markdown(body, headers, numeric_from=len(labels) - 1)


def _target(frame: pd.DataFrame) -> pd.Series:
    """"device/backend", plus "/precision" when not fp32: one speed-up column each."""
    label = frame["device_id"].astype(str) + "/" + frame["backend"].astype(str)
    other = frame["precision"] != "fp32"
    return label.where(~other, label + "/" + frame["precision"].astype(str))


def cross_device_table(frame: pd.DataFrame) -> str:
    """Markdown: one row per (model, config, batch), one speed-up column per device/backend.

    Uses each configuration's newest measurement on each device. The MACs saving (the same on every device) sits next
    to the speed-ups, so it shows where a MACs saving turns into a latency saving.
    """
    latest = newest_per_configuration(frame).assign(_target=_target)
    keys = ["model", "config_id", "batch"]
    speedups = latest.groupby(keys + ["_target"])["speedup"].median().unstack("_target")
    facts = latest.groupby(keys)[["macs_saving", "head_ratio", "token_ratio"]].median()
    table = _unpruned_first(facts.join(speedups).reset_index(), ["model"])
    targets = sorted(speedups.columns)
    body = [
        [_markdown_text(row["model"]), _markdown_text(row["config_id"]), format_cell(row["batch"], 0), format_cell(row["macs_saving"], 1, 100.0)]
        + [format_cell(row[t], 2) for t in targets]
        for _, row in table.iterrows()
    ]
    headers = ["model", "config", "batch", "MACs saved %"] + [_markdown_text(t) for t in targets]
    return _markdown(body, headers, numeric_from=2)


# ----------------------------------------------------------------------------- Pareto


def pareto_front(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows no other row dominates (lower `x` better, higher `y` better), sorted by `x`.

    Rows with NaN in `x` or `y` are left out. Equal points do not dominate each other, so
    duplicates on the front are all kept.
    """
    missing = [c for c in (x, y) if c not in frame.columns]
    if missing:
        raise InputError(f"no column {missing} in the frame")
    valid = frame.dropna(subset=[x, y])
    xs, ys = valid[x].to_numpy(float), valid[y].to_numpy(float)
    # [i, j]: row i is at least as good as row j on both axes, and strictly better on one.
    no_worse = (xs[:, None] <= xs[None, :]) & (ys[:, None] >= ys[None, :])
    better = (xs[:, None] < xs[None, :]) | (ys[:, None] > ys[None, :])
    dominated = (no_worse & better).any(axis=0)
    return valid[~dominated].sort_values([x, y], ascending=[True, False], kind="stable")


def _plotted(frame: pd.DataFrame, column: str) -> np.ndarray:
    scale = 100.0 if column in PERCENT_COLUMNS else 1.0
    return frame[column].to_numpy(float) * scale


def _series_label(device: str, backend: str, precision: str, batch: object) -> str:
    precision = "" if precision == "fp32" else f" {precision}"
    return f"{device}/{backend}{precision}, batch {format_cell(batch, 0)}"


def _draw_series(ax, frame: pd.DataFrame, x: str, y: str) -> None:
    """One scatter per device/backend/precision/batch, its own front as a step line."""
    groups = frame.groupby(["device_id", "backend", "precision", "batch"], sort=True)
    labelled: set[tuple] = set()  # series often share points (GMACs): label each point once
    for index, (key, group) in enumerate(groups):
        color = f"C{index % 10}"
        ax.scatter(_plotted(group, x), _plotted(group, y), color=color, label=_series_label(*key), zorder=3)
        front = pareto_front(group, x, y)
        # "post": from each front point on, that accuracy is reachable until the next point.
        ax.step(_plotted(front, x), _plotted(front, y), where="post", color=color, alpha=0.6)
        for px, py, name in zip(_plotted(group, x), _plotted(group, y), group["config_id"]):
            if (px, py, name) not in labelled:
                labelled.add((px, py, name))
                ax.annotate(str(name), (px, py), xytext=(4, 3), textcoords="offset points", fontsize=7)


def plot_pareto(frame: pd.DataFrame, out_dir: str | Path, x_metric: str, y_metric: str, filename: str) -> Path:
    """Write a PNG of `y_metric` against `x_metric` with each series' Pareto front; returns its path.

    Rows missing either value are left out; with none left the plot says so instead of
    failing, so a latency-only run still gets its report.
    """
    x_label, y_label = AXIS_LABELS.get(x_metric, x_metric), AXIS_LABELS.get(y_metric, y_metric)
    figure = Figure(figsize=(9, 6), layout="constrained")
    ax = figure.add_subplot()
    data = frame.dropna(subset=[x_metric, y_metric])
    if data.empty:
        ax.text(0.5, 0.5, f"no row has both {x_metric} and {y_metric}", ha="center", transform=ax.transAxes)
    else:
        _draw_series(ax, data, x_metric, y_metric)
        ax.legend(fontsize=8, loc="best")
        values = _plotted(data, x_metric)
        if values.min() > 0 and values.max() / values.min() > 20:
            ax.set_xscale("log")  # batch 1 and batch 32 latencies differ ~20x: keep both readable
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{y_label} vs {x_label}\nstep lines: Pareto fronts (lower x and higher y are better)")
    ax.grid(alpha=0.3)
    path = Path(out_dir) / filename
    return write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=120))


# ----------------------------------------------------------------------------- the report


def _accuracy_metric(frame: pd.DataFrame) -> str:
    # The occluded set is the point of this project; holistic Rank-1 when none was evaluated.
    return "occluded_rank1" if frame["occluded_rank1"].notna().any() else "query_rank1"


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _sources(frame: pd.DataFrame, latest: pd.DataFrame, root: Path) -> list[str]:
    """The header of the README: when, from what, and which runs are shown."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    files, shown = frame["source"].nunique(), latest["source"].nunique()
    lines = [
        f"Generated {now} from {files} CSV file(s) under `{root}`; "
        f"each configuration's newest measurement on each device is shown ({shown} file(s)):",
        "",
    ]
    runs = latest.groupby(["device_id", "run_id", "source"], sort=True)["timestamp"].max()
    for (device, run, source), stamp in runs.items():
        lines.append(f"- `{_relative(source, root)}`: run `{run}` of {device}, {stamp or 'no timestamp'}")
    return lines


def _device_section(latest: pd.DataFrame, device: str) -> list[str]:
    first = latest[latest["device_id"] == device].iloc[0]
    facts = [first["device_name"], f"{first['threads']:.0f} threads" if pd.notna(first["threads"]) else ""]
    facts += [f"torch {first['torch_version']}" if first["torch_version"] else "", first["os"]]
    facts += [f"git {first['git_revision']}" if first["git_revision"] else ""]
    return [f"## {device}", "", " · ".join(str(f) for f in facts if f), "", device_table(latest, device), ""]


def _readme(frame: pd.DataFrame, latest: pd.DataFrame, root: Path, accuracy: str) -> str:
    lines = ["# Benchmark report", ""] + _sources(frame, latest, root) + [""]
    for device in sorted(latest["device_id"].unique()):
        lines += _device_section(latest, device)
    lines += [
        "## Speed-up across devices",
        "",
        "Unpruned median latency / configuration median latency, timed interleaved in the same "
        "run on each device and backend: above 1.00 pruning pays there.",
        "",
        cross_device_table(latest),
        "",
        "## Accuracy against cost",
        "",
        f"Accuracy is {AXIS_LABELS[accuracy]}; the line through each series is its Pareto front.",
        "",
        f"![{accuracy} vs latency]({LATENCY_PLOT})",
        "",
        f"![{accuracy} vs GMACs]({MACS_PLOT})",
        "",
    ]
    return "\n".join(lines)


def build_report(results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Read every CSV under `results_dir`, write `out_dir`/README.md and PNG plots.

    Each configuration's newest measurement per device is reported, and the attention pictures
    of every model the suite recorded (amg.reporting.pictures). Every file is written atomically. Returns the
    written paths (README first). No CSV found raises `ReportError` naming the folder.
    """
    root, out = Path(results_dir), Path(out_dir)
    frame = load_reports(_csvs_under(root))
    latest = newest_per_configuration(frame)
    accuracy = _accuracy_metric(latest)
    plots = [
        plot_pareto(latest, out, "latency_median_ms", accuracy, LATENCY_PLOT),
        plot_pareto(latest, out, "gmacs", accuracy, MACS_PLOT),
    ]
    from amg.reporting.equal_macs import section as equal_macs_section  # it imports this module
    from amg.reporting.pictures import draw_records  # torch and timm: only when pictures are drawn

    pictures = draw_records(root, out)
    text = "\n".join([_readme(frame, latest, root, accuracy), equal_macs_section(latest),
                       _pictures_section(pictures, out)])
    readme = write_atomic(out / "README.md", lambda stream: stream.write(text.encode("utf-8")))
    return [readme, *plots, *(path for _, paths in pictures for path in paths)]


def _pictures_section(pictures: list, out: Path) -> str:
    if not pictures:
        return ""
    lines = ["## What AMG removes", "",
             "Per model: attention entropy of every head of the unpruned model on the calibration images "
             "(AMG removes high-entropy heads; × marks removed ones), and the key/value positions the AMG "
             "token plan keeps in a few blocks over a sample query image (static: the same for every image).", ""]
    for record, paths in pictures:
        lines += [f"### {record.model} ({Path(record.checkpoint).name})", ""]
        lines += [f"![{path.stem}]({path.relative_to(out)})" for path in paths] + [""]
    return "\n".join(lines)
