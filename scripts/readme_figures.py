"""Re-measure the README figures that no other command makes, and keep their outputs.

Usage: python scripts/readme_figures.py [OUT_DIR] [--only NAME ...]   (default results/readme-figures)

- untrained: the default preset with random weights (seeds 0, 1, 2) on the synthetic query
  sets (the "untrained model" row of "The embedded default, measured"; ~1 min);
- erasing: the default recipe for 1,000 steps with random erasing p = 0.5 and without
  (the erase_p remark under the training recipe; ~10 min);
- finetune800: heads + tokens at 30% of MACs (keep-one, as measured for the README), AMG and
  random, fine-tuned 800 steps (the 800-step figures of the equal-MACs notes; ~10 min).

Each figure is one JSON file: what was run and the `amg eval` metrics. Accuracy is
deterministic; the synthetic set and the default model come from the cache (AMG_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from amg.data.layout import load_dataset
from amg.files import write_text_atomic
from amg.model.config import DEFAULT_PRESET
from amg.model.vit import build_model
from amg.train.cache import synthetic_root, train_on_dataset
from amg.train.config import TrainConfig
from amg.train.evaluate import Evaluator


def _metrics(results: dict) -> dict:
    return {name: r.as_dict() | {"queries": r.num_queries} for name, r in results.items()}


def untrained(dataset) -> dict:
    labels = len({sample.pid for sample in dataset.train})
    runs = {}
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = build_model(DEFAULT_PRESET, num_classes=labels).eval()
        runs[f"seed {seed}"] = _metrics(Evaluator(dataset, model.config.img_size).evaluate(model))
    return {"what": f"{DEFAULT_PRESET} preset, random weights (torch.manual_seed(seed) before building)", "runs": runs}


def erasing(dataset) -> dict:
    runs = {}
    for erase_p in (0.0, 0.5):
        training = dataclasses.replace(TrainConfig(), steps=1000, erase_p=erase_p)
        model, summary = train_on_dataset(DEFAULT_PRESET, dataset, training)
        runs[f"erase_p {erase_p}"] = {"training": training.to_dict(), "summary": summary,
                                      "metrics": _metrics(Evaluator(dataset, model.config.img_size).evaluate(model.eval()))}
    return {"what": "the default recipe for 1,000 steps, with and without random erasing", "runs": runs}


def finetune800(dataset) -> dict:
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for policy in ("amg", "random"):
            out = Path(folder) / f"{policy}.pt"
            prune = ["amg", "prune", "--macs-saving", "0.3", "--saving-by", "both", "--allocation", "keep-one",
                     "--policy", policy, "--finetune", "800", "--threads", "2", "--out", str(out)]
            subprocess.run(prune, check=True)
            evaluation = subprocess.run(["amg", "eval", str(out), "--json", "--threads", "2"], check=True,
                                        capture_output=True, text=True)
            runs[policy] = {"command": " ".join(prune), "metrics": json.loads(evaluation.stdout)}
    return {"what": "heads + tokens at 30% of MACs, keep-one allocation, fine-tuned 800 distilled steps", "runs": runs}


FIGURES = {"untrained": untrained, "erasing": erasing, "finetune800": finetune800}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("results/readme-figures"))
    parser.add_argument("--only", nargs="+", choices=sorted(FIGURES), default=list(FIGURES))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    dataset = load_dataset(synthetic_root())
    for name in args.only:
        print(f"== {name}", file=sys.stderr)
        figure = FIGURES[name](dataset)
        path = write_text_atomic(args.out / f"{name}.json", json.dumps(figure, indent=1) + "\n")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
