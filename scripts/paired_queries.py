"""Paired accuracy differences between configurations of suite runs, from their per-query records.

Usage: python scripts/paired_queries.py RUN.csv [RUN2.csv ...] --pair A B [--pair A B ...]
       [--query-set occluded] [--metric ap|rank1]

For each pair, B minus A over the same queries (mean and 95% paired bootstrap interval), in
points; A and B are config ids (as in the CSVs), looked up in every run given (the last wins).
"""

from __future__ import annotations

import argparse
import sys

from tabulate import tabulate

from amg.benchmark.query_record import load_query_record
from amg.statistics import mean_difference_interval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="suite CSVs whose <run-id>.queries.json records to read")
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"),
                        help="two config ids: B - A is reported")
    parser.add_argument("--query-set", default="occluded", help="query set (default %(default)s)")
    parser.add_argument("--metric", default="ap", choices=["ap", "rank1"], help="per-query metric (default ap)")
    args = parser.parse_args(argv)
    values: dict[str, list] = {}
    for run in args.runs:
        for config_id, sets in load_query_record(run).items():
            if args.query_set in sets:
                values[config_id] = sets[args.query_set][args.metric]
    rows, missing = [], sorted({name for pair in args.pair for name in pair} - set(values))
    if missing:
        print(f"no per-query {args.query_set} values for: {', '.join(missing)}", file=sys.stderr)
        return 2
    for a, b in args.pair:
        delta, low, high = mean_difference_interval(values[a], values[b])
        rows.append([b, a, f"{100 * delta:+.1f}", f"[{100 * low:+.1f}, {100 * high:+.1f}]", len(values[a])])
    print(tabulate(rows, headers=["B", "A", f"B - A {args.query_set} {args.metric} (points)", "95% interval",
                                  "queries"], tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
