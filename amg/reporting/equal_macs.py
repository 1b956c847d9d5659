"""The equal-MACs comparison: every policy at the same fvcore MACs saving, as Markdown tables.

Rows named `save<target>:<method>[@<schedule>]` (the suite's `equal-macs` profile) become one
table per device, backend and target saving: each method and schedule with its measured
saving, speed-ups at batch 1 and 32 (and latency saving / MACs saving), peak memory and
holistic / occluded accuracy, next to
the unpruned model (and the unpruned model given the same fine-tuning, which shows what the
extra training alone buys).
"""

from __future__ import annotations

import pandas as pd

from amg.benchmark.profiles import PruneSpec
from amg.benchmark.query_record import load_query_record
from amg.pruning.schedule import SCHEDULES, Schedule
from amg.reporting.tables import MISSING, Markdown, format_cell, markdown_table, markdown_text, titled_tables
from amg.statistics import excludes_zero, mean_difference_interval

FAMILIES = ("heads", "tokens", "heads+tokens", "mlp", "heads+mlp", "heads+tokens+mlp")


def _family(method: str) -> str:
    """`heads`, `tokens`, `heads+tokens`, `mlp`, `heads+mlp` or `heads+tokens+mlp` (whatever the policies),
    from a method name."""
    return "+".join(part.split(":")[0] for part in method.split("+"))


def _family_rank(method: str) -> int:
    family = _family(method)
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)


def _schedule_rank(label: str) -> tuple[int, int]:
    """One-shot, then fine-tuned (shorter budgets first), then iterative."""
    schedule = Schedule.from_label(label)
    return SCHEDULES.index(schedule.kind), schedule.steps


def study_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The equal-MACs rows and the unpruned references, with target/method/schedule columns."""
    specs = frame["config_id"].astype(str).map(PruneSpec.from_config_id)
    study = frame.assign(target=specs.map(lambda s: s.saving if s is not None and s.saving else float("nan")),
                         method=specs.map(lambda s: s.method if s is not None else None),
                         schedule_label=specs.map(lambda s: s.schedule.label if s is not None else None),
                         seed=specs.map(lambda s: s.seed if s is not None else 0))
    # the unpruned model and its fine-tunings (not the class-token block: the studies' savings are the pruning's own)
    is_reference = specs.map(lambda s: s is not None and not s.prunes and not s.class_token_block)
    return study[study["target"].notna() | is_reference]


def _merged(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: batch-1 values, plus `speedup_b32` from the batch-32 row."""
    first = rows.sort_values("batch", kind="stable").groupby("config_id", sort=False).head(1).set_index("config_id")
    large = rows[rows["batch"] > 1].sort_values("batch").groupby("config_id").tail(1).set_index("config_id")
    first["speedup_large"] = large["speedup"]
    first["large_batch"] = large["batch"]
    return first.reset_index()


HEADERS = ["method", "schedule", "MACs saved %", "speed-up b1", "speed-up b{large}", "lat./MACs saving b1",
           "lat./MACs saving b{large}", "peak RSS MB",
           "R1 %", "mAP %", "occ. R1 %", "occ. mAP %", "occ. R1 / unpruned", "occ. mAP / unpruned",
           "occ. mAP − random [95%]"]
# The random policy of each family: what "AMG beats random" is measured against.
RANDOM_METHODS = {"heads": "heads:random", "tokens": "tokens:random", "heads+tokens": "heads:random+tokens:random",
                  "mlp": "mlp:random", "heads+mlp": "heads:random+mlp:random",
                  "heads+tokens+mlp": "heads:random+tokens:random+mlp:random"}


class QueryRecords:
    """Per-query accuracy of the runs behind the rows (`amg.benchmark.query_record`), read once each."""

    def __init__(self) -> None:
        self._records: dict[str, dict] = {}

    def values(self, row: pd.Series, metric: str = "ap", query_set: str = "occluded") -> list | None:
        source = str(row.get("source", ""))
        if source not in self._records:
            self._records[source] = load_query_record(source) if source else {}
        return self._records[source].get(str(row["config_id"]), {}).get(query_set, {}).get(metric)


def versus_random(row: pd.Series, group: pd.DataFrame, records: QueryRecords) -> str:
    """Occluded mAP of `row` minus its family's random policy at the same saving and schedule,
    paired over the same queries: "+2.4 [+1.5, +3.3]", "tie [-1.0, +2.0]" when the interval
    holds 0, or "—" without per-query values (runs before they were recorded) or a random row."""
    spread = row.get("seed_spread")
    if spread is not None and pd.notna(spread):  # the random draws themselves: how far apart they land
        return Markdown(f"spread of {row['draws']:.0f} seeds: {spread:.1f}")
    random_method = RANDOM_METHODS.get(_family(row["base_method"]))
    if random_method is None or row["base_method"] == random_method or "source" not in group:
        return MISSING
    rivals = group[(group["base_method"] == random_method) & (group["schedule_label"] == row["schedule_label"])
                   & (group["source"] == row.get("source"))]
    mine = records.values(row)
    theirs = None if rivals.empty else records.values(rivals.iloc[0])
    if mine is None or theirs is None or len(mine) != len(theirs):
        return MISSING
    delta, low, high = mean_difference_interval(theirs, mine)
    interval = f"[{100 * low:+.1f}, {100 * high:+.1f}]"
    return Markdown(f"{100 * delta:+.1f} {interval}" if excludes_zero(low, high) else f"tie {interval}")  # numbers only


def _line(row: pd.Series, unpruned: pd.Series, method: str, schedule: str, bold: bool = False,
          against_random: str = MISSING) -> list[str]:
    def share(metric: str) -> str:
        base = unpruned.get(metric)
        if base is None or pd.isna(base) or not base or pd.isna(row.get(metric)):
            return MISSING
        return f"{100 * float(row[metric]) / float(base):.0f}%"

    def saving_ratio(speedup: object) -> str:
        # the target: latency saving >= 0.8 x MACs saving
        macs = row.get("macs_saving")
        if speedup is None or pd.isna(speedup) or macs is None or pd.isna(macs) or macs <= 0:
            return MISSING
        return f"{(1 - 1 / float(speedup)) / float(macs):.2f}"

    name = f"**{method}**" if bold else method
    return [name, schedule, format_cell(row.get("macs_saving"), 1, 100.0), format_cell(row.get("speedup"), 2),
            format_cell(row.get("speedup_large"), 2), saving_ratio(row.get("speedup")),
            saving_ratio(row.get("speedup_large")), format_cell(row.get("peak_rss_mb"), 0),
            format_cell(row.get("query_rank1"), 1, 100.0), format_cell(row.get("query_mAP"), 1, 100.0),
            format_cell(row.get("occluded_rank1"), 1, 100.0), format_cell(row.get("occluded_mAP"), 1, 100.0),
            share("occluded_rank1"), share("occluded_mAP"), against_random]


AVERAGED = ["macs_saving", "speedup", "speedup_large", "peak_rss_mb", "query_rank1", "query_mAP", "occluded_rank1",
            "occluded_mAP"]


def _seeds_averaged(group: pd.DataFrame) -> pd.DataFrame:
    """Draws of one random configuration (seeds) as one row: the mean of each value, named
    `method ×N`, with the spread of occluded mAP (max − min, points) in `seed_spread`. The
    seed-0 row keeps its `config_id` and source, so paired comparisons still find it; the
    method's own name stays in `base_method`."""
    rows = []
    for _, draws in group.groupby(["method", "schedule_label"], sort=False):
        first = draws.sort_values("seed").iloc[0].copy()
        first["base_method"], first["draws"] = first["method"], len(draws)
        if len(draws) > 1:
            for column in AVERAGED:
                if column in draws:
                    first[column] = draws[column].mean()
            first["method"] = f"{first['method']} ×{len(draws)}"
            first["seed_spread"] = 100 * (draws["occluded_mAP"].max() - draws["occluded_mAP"].min())
        rows.append(first)
    return pd.DataFrame(rows)


def comparison_tables(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """[(title, markdown)] per device, model, backend and target saving (models measured with data). Within a target, rows go by
    family (heads, tokens, heads+tokens) and schedule; the best occluded mAP of each family
    and schedule is in bold (ties all bold)."""
    study = study_rows(frame)
    records = QueryRecords()
    tables = []
    for (device, model, backend, precision), rows in study.groupby(["device_id", "model", "backend", "precision"],
                                                                    sort=True):
        if rows[["occluded_mAP", "query_mAP"]].isna().all().all():
            continue  # timed without data (random weights): the runtime tables show those
        merged = _merged(rows)
        references = merged[merged["target"].isna()]
        unpruned_rows = references[references["config_id"] == "unpruned"]
        if unpruned_rows.empty:
            continue
        unpruned = unpruned_rows.iloc[0]
        large = merged["large_batch"].dropna()
        headers = [h.format(large=int(large.iloc[0]) if len(large) else "32") for h in HEADERS]
        for target, group in merged[merged["target"].notna()].groupby("target", sort=True):
            body = [_line(unpruned, unpruned, "unpruned", "—")]
            controls = references[references["config_id"] != "unpruned"]
            controls = controls.assign(_schedule=controls["schedule_label"].map(_schedule_rank)).sort_values("_schedule")
            for _, control in controls.iterrows():
                body.append(_line(control, unpruned, "unpruned", control["schedule_label"]))
            group = _seeds_averaged(group)
            group = group.assign(_family=group["base_method"].map(_family_rank),
                                 _schedule=group["schedule_label"].map(_schedule_rank))
            group = group.sort_values(["_family", "_schedule", "occluded_mAP"], ascending=[True, True, False],
                                      kind="stable")
            best = group.groupby(["_family", "_schedule"])["occluded_mAP"].transform("max")
            for (_, row), top in zip(group.iterrows(), best):
                body.append(_line(row, unpruned, row["method"], row["schedule_label"],
                                  bold=pd.notna(top) and row["occluded_mAP"] == top,
                                  against_random=versus_random(row, group, records)))
            precision_label = "" if precision == "fp32" else " " + precision
            title = Markdown(f"{markdown_text(device)} / {markdown_text(model)} / "
                             f"{markdown_text(backend)}{markdown_text(precision_label)}: {target:.0%} of MACs saved")
            tables.append((title, markdown_table(body, headers, numeric_from=2)))
    return tables


_INTRO = (
    "Every policy at the same target saving of fvcore MACs (`pytest bench/ --amg-profile equal-macs`). "
    "Schedules: one-shot; `ft<N>` = one-shot plan + N fine-tuning steps distilled from the unpruned "
    "model; `it<R>x<N>` = R rounds of prune, fine-tune, re-score with N steps in all. Speed-ups are "
    "interleaved with the unpruned model in the same run; `lat./MACs saving` is latency saving ÷ MACs "
    "saving (1.00: latency falls as much as MACs); accuracy is on the synthetic holistic and "
    "occluded query sets; bold: best occluded mAP of its family and schedule. `occ. mAP − random`: "
    "the difference to the random policy of the same family and schedule (its seed-0 draw), paired "
    "over the same queries with its 95% bootstrap interval (`tie` when the interval holds 0; `—` for "
    "runs recorded before per-query values were kept). A random policy drawn with several seeds is one "
    "row, `×N`: the mean of its draws, with the spread of their occluded mAP. A method missing from a "
    "table cannot reach that saving on this model."
)


def section(frame: pd.DataFrame) -> str:
    """The README section: all comparison tables, or "" when no equal-MACs run is among the CSVs."""
    return titled_tables("Equal-MACs comparison", _INTRO, comparison_tables(frame))
