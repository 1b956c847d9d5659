"""Pareto fronts of accuracy against cost, and their plots.

Plots use `matplotlib.figure.Figure` directly instead of pyplot: no display is needed, no
global backend is switched for whoever imports this module, and no figure is left open.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from amg.errors import InputError
from amg.files import write_png_atomic
from amg.reporting.tables import PERCENT_COLUMNS, format_cell

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
LATENCY_PLOT = "accuracy_vs_latency.png"
MACS_PLOT = "accuracy_vs_gmacs.png"


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
    return write_png_atomic(figure, path)
