"""Markdown tables of benchmark rows: one per device, and speed-ups across devices."""

from __future__ import annotations

import re

import pandas as pd
from tabulate import tabulate

from amg.benchmark.profiles import UNPRUNED
from amg.benchmark.results import MEASURE_COLUMNS, ReportError
from amg.reporting.loading import newest_per_configuration

class Markdown(str):
    """Text this project wrote for the report (formatted numbers, its own markup, text already
    escaped): `markdown_text` leaves it as it is. Every other string (anything a CSV or a record
    holds) is escaped where it enters a table, heading or list item."""


MISSING = Markdown("—")  # shown for a value that was not measured
# Stored as fractions (0..1); tables and plots show them in percent.
PERCENT_COLUMNS = {"macs_saving", "latency_saving"} | {
    c for c in MEASURE_COLUMNS if c.startswith(("query_", "occluded_"))
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

def format_cell(value: object, decimals: int, scale: float = 1.0) -> str:
    if value is None or pd.isna(value):
        return MISSING
    return Markdown(f"{float(value) * scale:.{decimals}f}")


def format_interval(value: object, low: object, high: object, decimals: int = 2) -> str:
    """`value [low, high]`, or the value alone when its interval was not measured."""
    if pd.isna(low) or pd.isna(high) or pd.isna(value):
        return format_cell(value, decimals)
    return Markdown(f"{float(value):.{decimals}f} [{float(low):.{decimals}f}, {float(high):.{decimals}f}]")


_MARKDOWN_SPECIAL = re.compile(r"([\\\[\]<>|!`])")


def markdown_text(text: object) -> Markdown:
    """`text` safe in a Markdown cell, heading or list item: one line, and no character that
    could end a cell, start a link or image, open an HTML tag or a code span (backslash-escaped,
    so it still reads as itself). The report's one escaping: `Markdown` text passes unchanged,
    so escaping twice is escaping once."""
    if isinstance(text, Markdown):
        return text
    return Markdown(_MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split())))


def is_unpruned(frame: pd.DataFrame) -> pd.Series:
    # By name, or by ratios both 0 for configurations named otherwise (e.g. "heads=0,tokens=0").
    named = frame["config_id"].astype(str).str.lower() == UNPRUNED.config_id
    mlp = frame["mlp_ratio"].fillna(0) if "mlp_ratio" in frame else 0  # older reports have no MLP pruning
    return named | ((frame["head_ratio"] == 0) & (frame["token_ratio"] == 0) & (mlp == 0))


def _unpruned_first(frame: pd.DataFrame, groups: list[str]) -> pd.DataFrame:
    """Sorted by `groups`, then the unpruned configuration, then the others by name."""
    order = frame.assign(_pruned=~is_unpruned(frame))
    return order.sort_values(groups + ["_pruned", "config_id"], kind="stable").drop(columns="_pruned")


def markdown_table(rows: list[list[object]], headers: list[object], numeric_from: int) -> str:
    """A GitHub table; every cell and header goes through `markdown_text`."""
    # disable_numparse: tabulate would otherwise re-format "1.20" as "1.2".
    align = ["left"] * numeric_from + ["right"] * (len(headers) - numeric_from)
    return tabulate([[markdown_text(cell) for cell in row] for row in rows], headers=list(map(markdown_text, headers)),
                    tablefmt="github", disable_numparse=True, colalign=align)


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
        [markdown_text(row[c]) for c in varying]
        + [markdown_text(row["config_id"]), markdown_text(row["backend"]), format_cell(row["batch"], 0)]
        + [format_cell(row[column], decimals, scale) for _, column, decimals, scale in DEVICE_COLUMNS]
        for _, row in rows.iterrows()
    ]
    return markdown_table(body, headers, numeric_from=len(labels) - 1)


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
        [markdown_text(row["model"]), markdown_text(row["config_id"]), format_cell(row["batch"], 0), format_cell(row["macs_saving"], 1, 100.0)]
        + [format_cell(row[t], 2) for t in targets]
        for _, row in table.iterrows()
    ]
    headers = ["model", "config", "batch", "MACs saved %"] + [markdown_text(t) for t in targets]
    return markdown_table(body, headers, numeric_from=2)


def group_heading(*labels: object, batch: object) -> str:
    """The heading of one group's table: `device · model · … · batch N`."""
    return Markdown(" · ".join([markdown_text(label) for label in labels] + [f"batch {float(batch):.0f}"]))


def titled_tables(heading: str, intro: str, tables: list[tuple[str, str]]) -> str:
    """A report section: `## heading`, the intro paragraph, then each (title, table) under `###`;
    '' when there is no table."""
    if not tables:
        return ""
    lines = [f"## {markdown_text(heading)}", "", intro, ""]
    for title, table in tables:
        lines += [f"### {markdown_text(title)}", "", table, ""]
    return "\n".join(lines)
