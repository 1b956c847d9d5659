"""What computing the last block for the class token alone saves: fvcore MACs and an
interleaved eager-PyTorch speed-up per preset, unpruned (random weights: the features are the
same either way, tests/test_class_token_block.py checks that).

Usage: python scripts/class_token_block.py [OUT_DIR] [--threads 2]   (default results/class-token-block)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from amg.files import write_text_atomic
from amg.measure.flops import count_macs
from amg.measure.latency import paired_rounds, paired_speedup
from amg.model.vit import build_model

PRESETS = ("small", "vit_small", "vit_base")
ROUNDS = {"small": 300, "vit_small": 60, "vit_base": 30}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("results/class-token-block"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for preset in PRESETS:
        torch.manual_seed(0)
        full = build_model(preset).eval()
        fast = copy.deepcopy(full).use_class_token_last_block()
        images = torch.randn(1, 3, *full.config.img_size)
        with torch.no_grad():
            gap = float((full(images) - fast(images)).abs().max())
            speedup = paired_speedup(*paired_rounds(lambda: full(images), lambda: fast(images), ROUNDS[preset]))
        macs_full, macs_fast = count_macs(full).total, count_macs(fast).total
        rows.append([preset, "x".join(map(str, full.config.img_size)), full.config.depth,
                     f"{100 * (1 - macs_fast / macs_full):.1f}", f"{speedup.ratio:.3f} [{speedup.low:.3f}, {speedup.high:.3f}]",
                     f"{gap:.1e}"])
        print(rows[-1], file=sys.stderr)
    table = tabulate(rows, headers=["preset", "input", "blocks", "MACs saved %", "eager speed-up b1 [95%]",
                                    "max |feature difference|"], tablefmt="github")
    text = ("# The last block for the class token only\n\n"
            f"`python scripts/class_token_block.py --threads {args.threads}`: unpruned presets, random weights, "
            "batch 1, eager PyTorch on the CPU, the full and the class-token-only model timed interleaved.\n\n"
            + table + "\n")
    write_text_atomic(args.out / "README.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
