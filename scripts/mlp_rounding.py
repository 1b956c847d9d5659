"""Does rounding each block's MLP width to a multiple of 8 or 16 change latency on ONNX Runtime
and OpenVINO? ViT-Small at 256x128 (random weights), MLP channels removed at random by one
global ranking (so the widths are odd), against the same plan unrounded and against the
unpruned model, timed interleaved on each runtime.

Usage: python scripts/mlp_rounding.py [OUT_DIR] [--threads 2] [--ratio 0.3]   (default results/mlp-rounding)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from amg.files import write_text_atomic
from amg.measure.backends import prepare
from amg.measure.flops import count_macs
from amg.measure.latency import paired_rounds, paired_speedup
from amg.model.pruned import apply_plan
from amg.model.vit import build_model
from amg.pruning.planner import make_plan

MULTIPLES = (1, 8, 16)
BACKENDS = ("onnxruntime", "openvino")
ROUNDS = 60


def _interval(speedup) -> str:
    return f"{speedup.ratio:.3f} [{speedup.low:.3f}, {speedup.high:.3f}]"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("results/mlp-rounding"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--preset", default="vit_small")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_model(args.preset).eval()
    models = {m: apply_plan(copy.deepcopy(base), make_plan(base, mlp=args.ratio, mlp_policy="random",
                                                           mlp_multiple=m)) for m in MULTIPLES}
    base_macs = count_macs(base).total
    rows = []
    for backend in BACKENDS:
        unpruned = prepare(backend, copy.deepcopy(base), 1, threads=args.threads)
        runners = {m: prepare(backend, copy.deepcopy(model), 1, threads=args.threads) for m, model in models.items()}
        for multiple, runner in runners.items():
            widths = [layer.mlp.fc1.out_features for layer in models[multiple].backbone.blocks]
            versus_unpruned = paired_speedup(*paired_rounds(unpruned, runner, ROUNDS))
            versus_odd = paired_speedup(*paired_rounds(runners[1], runner, ROUNDS)) if multiple > 1 else None
            rows.append([backend, multiple, f"{min(widths)}-{max(widths)}", sum(w % 8 != 0 for w in widths),
                         f"{100 * (1 - count_macs(models[multiple]).total / base_macs):.1f}",
                         _interval(versus_unpruned), _interval(versus_odd) if versus_odd else "—"])
            print(rows[-1], file=sys.stderr)
    table = tabulate(rows, headers=["backend", "multiple", "MLP widths", "blocks not a multiple of 8",
                                    "MACs saved %", "speed-up vs unpruned [95%]", "vs multiple 1 [95%]"],
                     tablefmt="github")
    text = ("# Rounding MLP widths\n\n"
            f"`python scripts/mlp_rounding.py --threads {args.threads} --ratio {args.ratio} --preset {args.preset}`: "
            f"{args.preset} at 256x128 with random weights, {args.ratio:.0%} of the MLP channels removed at random "
            "(one global ranking, so the widths differ per block), each block's width rounded to a multiple of "
            f"1, 8 or 16; batch 1, {args.threads} threads, {ROUNDS} interleaved pairs per speed-up.\n\n" + table + "\n")
    write_text_atomic(args.out / "README.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
