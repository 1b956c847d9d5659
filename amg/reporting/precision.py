"""Pruning vs reduced precision vs both: every configuration's speed-up over the unpruned fp32
model on the same device, backend and batch, with its accuracy as that precision runs it.

fp32 rows use `speedup` (interleaved with the unpruned fp32 model); reduced-precision rows
`fp32_speedup` (interleaved with the same reference). Both are therefore ratios measured in
one run against one reference, and comparable down a column.
"""

from __future__ import annotations

import pandas as pd

from amg.reporting.tables import MISSING, format_cell, is_unpruned, markdown_table, markdown_text, titled_tables

_ACCURACY = (("occluded R1 %", "occluded_rank1"), ("occluded mAP %", "occluded_mAP"),
             ("holistic mAP %", "query_mAP"))


def _interval(ratio: object, low: object, high: object) -> str:
    if pd.isna(ratio):
        return MISSING
    if pd.isna(low) or pd.isna(high):
        return format_cell(ratio, 2)
    return f"{float(ratio):.2f} [{float(low):.2f}, {float(high):.2f}]"


def _versus_fp32(row: pd.Series) -> str:
    if row["precision"] != "fp32":
        return _interval(row["fp32_speedup"], row["fp32_speedup_ci_low"], row["fp32_speedup_ci_high"])
    if is_unpruned(row.to_frame().T).iloc[0]:
        return "1.00 (reference)"
    return _interval(row["speedup"], row["speedup_ci_low"], row["speedup_ci_high"])


def precision_tables(latest: pd.DataFrame) -> list[tuple[str, str]]:
    """(title, Markdown table) per device / model / backend / batch that has reduced-precision rows."""
    reduced = latest[(latest["precision"] != "fp32") & latest["fp32_speedup"].notna()]
    tables = []
    keys = ["device_id", "model", "backend", "batch"]
    for key, _ in reduced.groupby(keys, sort=True):
        group = latest[(latest[keys] == pd.Series(key, index=keys)).all(axis=1)]
        group = group.assign(_pruned=~is_unpruned(group)).sort_values(["_pruned", "config_id", "precision"])
        body = [[markdown_text(row["config_id"]), markdown_text(row["precision"]),
                 format_cell(row["macs_saving"], 1, 100.0), _versus_fp32(row)]
                + [format_cell(row[column], 1, 100.0) for _, column in _ACCURACY]
                + [markdown_text(row["accuracy_of"]) if isinstance(row["accuracy_of"], str) else MISSING]
                for _, row in group.iterrows()]
        headers = ["config", "precision", "MACs saved %", "speed-up vs unpruned fp32 [95%]"] \
            + [header for header, _ in _ACCURACY] + ["accuracy of"]
        device, model, backend, batch = key
        title = f"{markdown_text(device)} · {markdown_text(model)} · {markdown_text(backend)} · batch {batch:.0f}"
        tables.append((title, markdown_table(body, headers, numeric_from=2)))
    return tables


def section(latest: pd.DataFrame) -> str:
    """The report's "Pruning vs reduced precision" section ('' when no run measured one)."""
    return titled_tables("Pruning vs reduced precision",
                         "Each row's speed-up is over the unpruned fp32 model on the same backend, interleaved in "
                         "the same run (95% bootstrap interval): the unpruned int8 row is what quantization alone "
                         "buys, a pruned fp32 row what pruning alone buys, a pruned int8 row both. Accuracy of a "
                         "reduced-precision row is that of the quantized model as the runtime runs it.",
                         precision_tables(latest))
