"""Each configuration's answer per query, beside the run's CSV (`<run-id>.queries.json`).

A CSV row holds a configuration's mean Rank-1 and mAP; whether one configuration beats another
is a question about their per-query differences (`amg.statistics.mean_difference_interval`),
so the run keeps, per configuration and query set, each valid query's AP and whether its
first match was at rank 1, in query order. Torch-free: `amg report` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amg.files import write_text_atomic

SUFFIX = ".queries.json"
VERSION = 1


def query_record_path(csv_path: str | Path) -> Path:
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + SUFFIX)


def per_query_values(query_ap, first_rank) -> dict[str, list]:
    """One query set's values as stored: AP (6 decimals) and Rank-1 hits (0/1)."""
    return {"ap": [round(float(v), 6) for v in query_ap], "rank1": [int(r == 1) for r in first_rank]}


def save_query_record(csv_path: str | Path, values: dict[str, dict[str, dict[str, list]]]) -> Path:
    """`values`: {config_id: {query set: per_query_values(...)}}, written atomically beside `csv_path`."""
    text = json.dumps({"version": VERSION, "configurations": values}, separators=(",", ":"))
    return write_text_atomic(query_record_path(csv_path), text + "\n")


def load_query_record(csv_path: str | Path) -> dict[str, Any]:
    """{config_id: {query set: {"ap": [...], "rank1": [...]}}}; empty without a record (older runs)."""
    path = query_record_path(csv_path)
    if not path.is_file():
        return {}
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a damaged record costs the intervals, never the report
    if payload.get("version") != VERSION:
        return {}
    return payload.get("configurations", {})
