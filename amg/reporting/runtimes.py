"""Which runtime is fastest, unpruned and pruned, and how much of a plan's MACs saving it turns
into latency there: a speed-up on a slow runtime is no answer for someone deploying on a fast one.

One table per device, model and batch measured on two or more backends at fp32: each
configuration's median latency per backend, the fastest backend, and on it the ratio
latency saving / MACs saving (from the speed-up interleaved with the unpruned model, with
the ratio's range from the speed-up's 95% interval).
"""

from __future__ import annotations

import pandas as pd

from amg.reporting.tables import (
    MISSING,
    format_cell,
    format_interval,
    group_heading,
    is_unpruned,
    markdown_table,
    markdown_text,
    titled_tables,
)


def saving_ratio(speedup: object, macs_saving: object) -> float:
    """(1 - 1 / speed-up) / MACs saving: 1.0 means latency falls as much as the MACs."""
    if pd.isna(speedup) or pd.isna(macs_saving) or float(macs_saving) <= 0 or float(speedup) <= 0:
        return float("nan")
    return (1 - 1 / float(speedup)) / float(macs_saving)


def _ratio_cell(row: pd.Series) -> str:
    ratio = saving_ratio(row["speedup"], row["macs_saving"])
    if pd.isna(ratio):
        return MISSING
    low, high = (saving_ratio(row[c], row["macs_saving"]) for c in ("speedup_ci_low", "speedup_ci_high"))
    return format_interval(ratio, low, high)


def runtime_tables(latest: pd.DataFrame) -> list[tuple[str, str]]:
    fp32 = latest[latest["precision"] == "fp32"]
    tables = []
    for (device, model, batch), group in fp32.groupby(["device_id", "model", "batch"], sort=True):
        backends = sorted(group["backend"].unique())
        if len(backends) < 2:
            continue
        medians = group.pivot_table(index="config_id", columns="backend", values="latency_median_ms", aggfunc="first")
        facts = group.groupby("config_id").first()
        unpruned = set(group.loc[is_unpruned(group), "config_id"])
        order = sorted(medians.index, key=lambda c: (c not in unpruned, facts.loc[c, "macs_saving"], c))
        body = []
        for config in order:
            times = medians.loc[config].dropna()
            fastest = times.idxmin() if len(times) else None
            on_fastest = group[(group["config_id"] == config) & (group["backend"] == fastest)]
            body.append([markdown_text(config), format_cell(facts.loc[config, "macs_saving"], 1, 100.0)]
                        + [format_cell(medians.loc[config].get(b), 2) for b in backends]
                        + [markdown_text(fastest) if fastest else MISSING,
                           _ratio_cell(on_fastest.iloc[0]) if len(on_fastest) else MISSING])
        headers = ["config", "MACs saved %"] + [f"{b} ms" for b in backends] + [
            "fastest", "latency saving / MACs saving there [95%]"]
        tables.append((group_heading(device, model, batch=batch), markdown_table(body, headers, numeric_from=1)))
    return tables


def section(latest: pd.DataFrame) -> str:
    """The report's "Fastest runtime" section ('' when no configuration ran on two backends)."""
    return titled_tables("Fastest runtime",
                         "Median latency of each configuration on each backend (fp32), the fastest backend, and "
                         "there the ratio latency saving / MACs saving (1.00: latency falls as much as the MACs; "
                         "from the speed-up interleaved with the unpruned model on that backend). Medians of "
                         "different backends come from different moments of the run; the ratio does not.",
                         runtime_tables(latest))
