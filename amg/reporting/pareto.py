"""Pareto fronts of accuracy against cost, and their plots.

Plots use `matplotlib.figure.Figure` directly instead of pyplot: no display is needed, no
global backend is switched for whoever imports this module, and no figure is left open.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from amg.benchmark.profiles import PruneSpec
from amg.errors import InputError
from amg.files import write_png_atomic
from amg.pruning.policies import is_dynamic
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
PANELS_PER_ROW = 3


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
    # One sweep in x order (O(n log n): a table of all pairs would take n^2 memory at 10^5 rows).
    # A row is dominated by a row of smaller x and no lower y, or by one of equal x and higher y.
    order = np.lexsort((-ys, xs))
    sorted_x, sorted_y = xs[order], ys[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # first row of each x value
    group = np.cumsum(np.r_[True, sorted_x[1:] != sorted_x[:-1]]) - 1
    best_of_group = sorted_y[starts]  # y sorted high first within an x value
    best_before = np.r_[-np.inf, np.maximum.accumulate(best_of_group)[:-1]]
    dominated_sorted = (best_before[group] >= sorted_y) | (best_of_group[group] > sorted_y)
    dominated = np.empty(len(xs), dtype=bool)
    dominated[order] = dominated_sorted
    return valid[~dominated].sort_values([x, y], ascending=[True, False], kind="stable")


def _plotted(frame: pd.DataFrame, column: str) -> np.ndarray:
    scale = 100.0 if column in PERCENT_COLUMNS else 1.0
    return frame[column].to_numpy(float) * scale


def _series_label(device: str, backend: str, precision: str, batch: object) -> str:
    precision = "" if precision == "fp32" else f" {precision}"
    return f"{device}/{backend}{precision}, batch {format_cell(batch, 0)}"


FAMILIES = ("unpruned", "heads", "tokens", "heads+tokens", "ToMe / EViT", "MLP channels", "other")


def policy_family(config_id: str) -> str:
    """What a configuration prunes, for colouring: heads, static tokens, both, dynamic tokens, or
    MLP channels (with or without the others)."""
    spec = PruneSpec.from_config_id(str(config_id))
    if spec is None:
        return "other"
    if spec.uses_mlp:
        return "MLP channels"
    if not spec.prunes:
        return "unpruned"
    if spec.uses_tokens and is_dynamic(spec.token_policy):
        return "ToMe / EViT"
    return "heads+tokens" if spec.uses_heads and spec.uses_tokens else ("heads" if spec.uses_heads else "tokens")


def _draw_series(ax, group: pd.DataFrame, x: str, y: str) -> None:
    """One panel: every configuration as a dot coloured by its family, the Pareto front as a
    step line, and only the front's points labelled (the rest would bury each other)."""
    families = group["config_id"].map(policy_family)
    for family in FAMILIES:
        members = group[families == family]
        if not members.empty:
            ax.scatter(_plotted(members, x), _plotted(members, y), color=f"C{FAMILIES.index(family)}",
                       label=family, s=18, zorder=3)
    front = pareto_front(group, x, y)
    # "post": from each front point on, that accuracy is reachable until the next point.
    ax.step(_plotted(front, x), _plotted(front, y), where="post", color="0.4", alpha=0.7, zorder=2)
    for px, py, name in zip(_plotted(front, x), _plotted(front, y), front["config_id"]):
        ax.annotate(str(name), (px, py), xytext=(4, 3), textcoords="offset points", fontsize=7)


def plot_pareto(frame: pd.DataFrame, out_dir: str | Path, x_metric: str, y_metric: str, filename: str) -> Path:
    """Write a PNG of `y_metric` against `x_metric`, one panel per device/backend/precision/batch
    with its Pareto front; returns its path.

    Rows missing either value are left out; with none left the plot says so instead of
    failing, so a latency-only run still gets its report.
    """
    x_label, y_label = AXIS_LABELS.get(x_metric, x_metric), AXIS_LABELS.get(y_metric, y_metric)
    data = frame.dropna(subset=[x_metric, y_metric])
    groups = list(data.groupby(["device_id", "backend", "precision", "batch"], sort=True))
    columns = min(max(len(groups), 1), PANELS_PER_ROW)
    rows = max(1, math.ceil(len(groups) / columns))
    figure = Figure(figsize=(5.5 * columns, 4.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    if not groups:
        axes[0].text(0.5, 0.5, f"no row has both {x_metric} and {y_metric}", ha="center",
                     transform=axes[0].transAxes)
    for ax, (key, group) in zip(axes, groups):
        _draw_series(ax, group, x_metric, y_metric)
        ax.set_title(_series_label(*key), fontsize=9)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    if groups:
        handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
        figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles), fontsize=8)
    figure.suptitle(f"{y_label} vs {x_label}: Pareto fronts labelled (lower x and higher y are better)")
    path = Path(out_dir) / filename
    return write_png_atomic(figure, path)
