"""Pruning vs reduced precision vs both: every configuration's speed-up over the unpruned fp32
model on the same device, backend and batch, with its accuracy as that precision runs it.

fp32 rows use `speedup` (interleaved with the unpruned fp32 model); reduced-precision rows
`fp32_speedup` (interleaved with the same reference). Both are therefore ratios measured in
one run against one reference, and comparable down a column.
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

_ACCURACY = (("occluded R1 %", "occluded_rank1"), ("occluded mAP %", "occluded_mAP"),
             ("holistic mAP %", "query_mAP"))


def _versus_fp32(row: pd.Series) -> str:
    if row["precision"] != "fp32":
        return format_interval(row["fp32_speedup"], row["fp32_speedup_ci_low"], row["fp32_speedup_ci_high"])
    if not row["_pruned"]:
        return "1.00 (reference)"
    return format_interval(row["speedup"], row["speedup_ci_low"], row["speedup_ci_high"])


def precision_tables(latest: pd.DataFrame) -> list[tuple[str, str]]:
    """(title, Markdown table) per device / model / backend / batch that has reduced-precision rows."""
    tables = []
    for key, group in latest.groupby(["device_id", "model", "backend", "batch"], sort=True):
        if not ((group["precision"] != "fp32") & group["fp32_speedup"].notna()).any():
            continue
        group = group.assign(_pruned=~is_unpruned(group)).sort_values(["_pruned", "config_id", "precision"])
        body = [[markdown_text(row["config_id"]), markdown_text(row["precision"]),
                 format_cell(row["macs_saving"], 1, 100.0), _versus_fp32(row)]
                + [format_cell(row[column], 1, 100.0) for _, column in _ACCURACY]
                + [markdown_text(row["accuracy_of"]) if isinstance(row["accuracy_of"], str) else MISSING]
                for _, row in group.iterrows()]
        headers = ["config", "precision", "MACs saved %", "speed-up vs unpruned fp32 [95%]"] \
            + [header for header, _ in _ACCURACY] + ["accuracy of"]
        device, model, backend, batch = key
        heading = group_heading(device, model, backend, batch=batch)
        tables.append((heading, markdown_table(body, headers, numeric_from=2)))
    return tables


def section(latest: pd.DataFrame) -> str:
    """The report's "Pruning vs reduced precision" section ('' when no run measured one)."""
    return titled_tables("Pruning vs reduced precision",
                         "Each row's speed-up is over the unpruned fp32 model on the same backend, interleaved in "
                         "the same run (95% bootstrap interval): the unpruned int8 row is what quantization alone "
                         "buys, a pruned fp32 row what pruning alone buys, a pruned int8 row both. Accuracy of a "
                         "reduced-precision row is that of the quantized model as the runtime runs it.",
                         precision_tables(latest))
