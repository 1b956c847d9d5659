"""The table of `scripts/reference-modes`: plans and accuracy of AMG's reference modes and variants.

Usage: python scripts/reference_modes_table.py DIR   (writes DIR/README.md from DIR/*.plan.json + *.eval.json)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from tabulate import tabulate

from amg.files import write_text_atomic
from amg.measure.flops import count_macs
from amg.model.config import PRESETS
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan
from amg.model.vit import ReIDViT


def fvcore_saving(plan: PrunePlan, model: ReIDViT, full_macs: int) -> float:
    """fvcore MACs saved by `plan` on `model` (the default preset: weights do not change counts)."""
    return 1 - count_macs(apply_plan(copy.deepcopy(model), plan)).total / full_macs


def removed_heads(plan: PrunePlan) -> set[tuple[int, int]]:
    return {(b, h) for b, kept in enumerate(plan.kept_heads) for h in range(plan.num_heads) if h not in kept}


def dropped_tokens(plan: PrunePlan) -> set[tuple[int, int]]:
    return {(b, p) for b, kept in enumerate(plan.kept_tokens) if kept is not None
            for p in range(plan.num_tokens) if p not in kept}


def main(folder: Path) -> str:
    model = ReIDViT(PRESETS["small"]).eval()
    full_macs = count_macs(model).total
    plans = {f.name[:-len(".plan.json")]: PrunePlan.load(f) for f in sorted(folder.glob("*.plan.json"))}
    rows = []
    for name, plan in plans.items():
        evaluation = json.loads((folder / f"{name}.eval.json").read_text())
        saving, by, allocation, loss, steps = name.split("_")  # as scripts/reference-modes names them
        base = plans.get(f"{saving}_{by}_global_id_{steps}")
        differs = "—" if base is None or base is plan else (
            f"{len(removed_heads(plan) ^ removed_heads(base)) // 2} heads, "
            f"{len(dropped_tokens(plan) ^ dropped_tokens(base)) // 2} K/V")
        rows.append([saving[len("save"):], by, allocation, loss, steps[len("ft"):],
                     f"{100 * fvcore_saving(plan, model, full_macs):.1f}", plan.heads_kept,
                     sum(1 for heads in plan.kept_heads if not heads), differs,
                     *(f"{100 * evaluation[queries][metric]:.1f}"
                       for queries in ("query", "occluded") for metric in ("rank1", "mAP"))])
    headers = ["target saving", "by", "allocation", "calibration loss", "fine-tune steps", "MACs saved %",
               "heads kept", "emptied blocks", "plan differs from global/id by", "R1 %", "mAP %", "occ. R1 %",
               "occ. mAP %"]
    return tabulate(rows, headers=headers, tablefmt="github")


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    table = main(folder)
    text = ("# AMG's reference modes at equal MACs (the embedded default model)\n\n"
            "Made by `scripts/reference-modes` (which calls `amg prune --macs-saving S --saving-by B "
            "--allocation A --calibration-loss L --finetune N` and `amg eval --json`); each configuration's "
            "plan (`*.plan.json`) and evaluation (`*.eval.json`) are beside this file. Accuracy on the "
            "synthetic set's holistic and occluded queries (519 each); MACs by fvcore. `plan differs` counts "
            "heads and K/V positions removed by one plan and not the other, against the reference's "
            "allocation and this project's default loss at the same saving and schedule.\n\n" + table + "\n")
    write_text_atomic(folder / "README.md", text)
    print(text)
