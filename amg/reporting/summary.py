"""The report's first screen: per device, backend and batch, the best configuration at 10, 20
and 30% of the MACs saved, its measured speed-up and what it keeps of the unpruned accuracy."""

from __future__ import annotations

import pandas as pd

from amg.reporting.tables import MISSING, format_cell, format_interval, is_unpruned, markdown_table, markdown_text

SUMMARY_SAVINGS = (0.1, 0.2, 0.3)
# A configuration counts "at 20%" when it saves at least 18%: MACs targets land within a point
# or two of the asked saving (ToMe's steps are coarser).
SAVING_SLACK = 0.02
GROUPS = ["device_id", "backend", "precision", "batch"]


def _accuracy_metric(frame: pd.DataFrame) -> str | None:
    for metric in ("occluded_mAP", "query_mAP"):
        if metric in frame and frame[metric].notna().any():
            return metric
    return None


def _speedup(row: pd.Series) -> str:
    return format_interval(row.get("speedup"), row.get("speedup_ci_low"), row.get("speedup_ci_high"))


def summary_table(latest: pd.DataFrame) -> tuple[str, str] | None:
    """(accuracy metric, Markdown table), or None when no row has an accuracy."""
    metric = _accuracy_metric(latest)
    if metric is None:
        return None
    rows = []
    for (device, backend, precision, batch), group in latest.groupby(GROUPS, sort=True):
        measured = group.dropna(subset=[metric])
        unpruned = measured[is_unpruned(measured)]
        if unpruned.empty:
            continue
        base = float(unpruned[metric].iloc[0])
        where = f"{backend}{'' if precision == 'fp32' else ' ' + precision}, batch {format_cell(batch, 0)}"
        for saving in SUMMARY_SAVINGS:
            eligible = measured[measured["macs_saving"] >= saving - SAVING_SLACK]
            if eligible.empty:
                rows.append([markdown_text(device), where, f"{saving:.0%}", "out of reach here", *[MISSING] * 4])
                continue
            best = eligible.sort_values([metric, "latency_median_ms"], ascending=[False, True], kind="stable").iloc[0]
            share = MISSING if base <= 0 else f"{100 * best[metric] / base:.0f}%"
            rows.append([markdown_text(device), where, f"{saving:.0%}", markdown_text(best["config_id"]),
                         format_cell(best["macs_saving"], 1, 100.0), _speedup(best),
                         format_cell(best[metric], 1, 100.0), share])
    if not rows:
        return None
    headers = ["device", "backend", "MACs saved ≥", "most accurate configuration", "MACs saved %",
               "speed-up [95%]", f"{metric} %", "of unpruned"]
    return metric, markdown_table(rows, headers, numeric_from=4)


def section(latest: pd.DataFrame) -> list[str]:
    found = summary_table(latest)
    if found is None:
        return []
    metric, table = found
    return ["## Summary", "",
            f"Per device, backend and batch: the configuration with the best {metric} among those that save at "
            f"least 10 / 20 / 30% of the MACs (within {SAVING_SLACK:.0%}), its speed-up over the unpruned model "
            "measured interleaved in the same run (with its 95% interval where the run recorded one), and the "
            "share of the unpruned model's accuracy it keeps. Details per device follow.", "", table, ""]
