"""Reading every benchmark CSV under a results folder into one frame, and each configuration's
newest measurement per device.

CSVs are read through `amg.benchmark.results.read_csv`, so a missing, truncated or off-schema
file fails here too, with its name.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import pandas as pd

from amg.benchmark.results import COLUMNS, ReportError, find_csvs
from amg.benchmark.results_file import ResultsFile, read_csv
from amg.benchmark.row_checks import NUMBER_RULES

NUMERIC_COLUMNS = list(NUMBER_RULES)  # read_csv has checked each against its rule


def csvs_under(root: Path) -> list[Path]:
    paths = find_csvs(root)  # raises, naming the folder, when it does not exist
    if not paths:
        raise ReportError(f"no results CSV found under {root} (expected {root}/<device-id>/<run-id>.csv)")
    return paths


def _paths(paths_or_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths_or_dir, (str, Path)):
        path = Path(paths_or_dir)
        # Not a folder: one file, which read_csv reports if it is missing.
        return csvs_under(path) if path.is_dir() else [path]
    paths = [Path(p) for p in paths_or_dir]
    if not paths:
        raise ReportError("no results files given")
    return paths


def _read(path: Path) -> ResultsFile:
    try:
        return read_csv(path)
    except csv.Error as error:  # read_csv lets the csv module's own errors through
        raise ReportError(f"{path} is not a readable CSV: {error}") from error


def load_reports(paths_or_dir: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """All rows of the given CSVs (or of every CSV under a results folder) as one frame.

    Each file goes through `read_csv`, so a bad one raises `ReportError` naming it. Numeric
    columns are numbers (empty -> NaN); the other columns are text ("" when empty). `source`
    is the file.
    """
    frames = []
    for path in _paths(paths_or_dir):
        results = _read(path)
        frames.append(results.frame.assign(source=str(results.path)))
    frame = pd.concat(frames, ignore_index=True)
    text = [c for c in frame.columns if c not in NUMERIC_COLUMNS]
    frame[text] = frame[text].astype(str)  # categories of different files do not concatenate as categories
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
