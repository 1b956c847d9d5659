"""The README's MLP-study table from the runs of the `mlp` and `mlp-long` profiles.

Usage: python scripts/mlp_study_table.py MLP_RUN.csv [LONG_RUN.csv ...] [--backend openvino]

One line per method and MACs saving: the measured saving, the one-shot speed-up on
`--backend` (batch 1, interleaved with the unpruned model), and occluded and holistic mAP
one-shot and after each fine-tuning budget found (random policies one-shot: the mean of their
seeds, with the range).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from tabulate import tabulate

from amg.benchmark.profiles import PruneSpec
from amg.benchmark.results_file import read_csv
from amg.pruning.schedule import ONE_SHOT

LABELS = {
    "unpruned": "unpruned",
    "mlp:taylor": "MLP channels, Taylor",
    "mlp:magnitude": "MLP channels, magnitude",
    "mlp:random": "MLP channels, random",
    "heads:amg+tokens:amg+mlp:taylor": "AMG heads + tokens + Taylor MLP",
    "heads:random+tokens:random+mlp:random": "random heads + tokens + MLP",
    "heads:amg+mlp:taylor": "AMG heads + Taylor MLP",
    "heads:random+mlp:random": "random heads + MLP",
    "heads:tp-taylor+mlp:tp-taylor": "Torch-Pruning Group-Taylor (heads + MLP)",
    "heads:tp-magnitude+mlp:tp-magnitude": "Torch-Pruning magnitude (heads + MLP)",
    "tokens:tome": "ToMe",
}


def _mean_and_range(values: list[float]) -> str:
    mean = 100 * sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({100 * min(values):.1f}–{100 * max(values):.1f}, ×{len(values)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--backend", default="openvino", help="backend of the speed-up column (default %(default)s)")
    args = parser.parse_args(argv)
    latest: dict[tuple[str, str], dict] = {}  # (config id, backend) -> row; a later run wins
    for run in args.runs:
        for row in read_csv(run).rows:
            if int(row["batch"]) == 1:
                latest[(row["config_id"], row["backend"])] = row
    # (saving, method) -> {"saving": ..., "speedup": ..., (metric, budget): [values, one per seed]}
    table: dict[tuple[float, str], dict] = defaultdict(lambda: defaultdict(list))
    budgets: set[str] = set()
    for (config_id, backend), row in latest.items():
        spec = PruneSpec.from_config_id(config_id)
        if spec is None or spec.class_token_block or spec.method not in LABELS:
            continue
        entry = table[(spec.saving, spec.method)]
        budget = "one-shot" if spec.schedule == ONE_SHOT else spec.schedule.label
        if backend == args.backend and spec.schedule == ONE_SHOT and spec.seed == 0:
            entry["speedup"] = row["speedup"]
        if backend != "cpu" or not row["occluded_mAP"]:  # accuracy: once per configuration
            continue
        budgets.add(budget)
        if spec.schedule == ONE_SHOT or "saving" not in entry:
            entry["saving"] = row["macs_saving"]
        for metric in ("occluded_mAP", "query_mAP"):
            entry[(metric, budget)].append(float(row[metric]))
    order = ["one-shot", *sorted(budgets - {"one-shot"}, key=lambda label: int(label.lstrip("ft") or 0))]
    headers = ["method", "MACs saved %", f"speed-up ({args.backend} b1)",
               *(f"occ. mAP {b}" for b in order), *(f"holistic mAP {b}" for b in order)]
    lines = []
    for (saving, method), entry in sorted(table.items(), key=lambda item: (item[0][0], list(LABELS).index(item[0][1]))):
        speedup = entry.get("speedup")
        lines.append([LABELS[method], f"{100 * float(entry['saving']):.1f}" if saving else "—",
                      f"{float(speedup):.2f}" if speedup else "—",
                      *(_mean_and_range(entry[(metric, b)]) if entry[(metric, b)] else "—"
                        for metric in ("occluded_mAP", "query_mAP") for b in order)])
    print(tabulate(lines, headers=headers, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
