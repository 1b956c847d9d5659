"""Selection: from per-block scores to the heads and key/value positions a plan keeps."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from amg.errors import InputError
from amg.pruning.policies import REFERENCE_ALLOCATION


def check_ratio(name: str, ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise InputError(f"{name} ratio must be in [0, 1), got {ratio}")
    return float(ratio)


def select_heads(removal_scores: Sequence[torch.Tensor], head_ids: Sequence[Sequence[int]], ratio: float,
                 allocation: str = "global", total_heads: int | None = None) -> list[list[int]]:
    """Kept original head numbers per block after removing `ratio` of all heads.

    `allocation` "per-block" spreads the removals evenly over blocks; any other ranks all
    heads together. "global" is the reference's rule: a block may lose every head in one
    go, and a block down to one head is left out of the ranking (an iterative round never
    empties it); the others ("keep-one", "normalized", "per-block") keep one head per block.

    `total_heads` (default: the heads now present) is what the ratio is a fraction of, so
    that iterative pruning can aim at a fraction of the original model. Higher score goes
    first.
    """
    check_ratio("head", ratio)
    present = sum(len(ids) for ids in head_ids)
    total = total_heads or present
    # at least one head stays in the model: without any, the class token never sees the image
    to_remove = min(round(ratio * total) - (total - present), present - 1)
    removed = [0] * len(head_ids)
    if allocation == REFERENCE_ALLOCATION:
        cap = [len(ids) if len(ids) > 1 else 0 for ids in head_ids]
    else:
        cap = [max(len(ids) - 1, 0) for ids in head_ids]
    remove: set[tuple[int, int]] = set()
    if allocation == "per-block":
        # Each block's whole share first; the remainder of the exact total (a ratio rarely
        # divides a block's heads) goes one extra per block, to the highest-scoring heads.
        share = ratio * total / len(head_ids)
        for block, (score, ids) in enumerate(zip(removal_scores, head_ids)):
            already = round(total / len(head_ids)) - len(ids)
            quota = max(0, min(math.floor(share) - already, cap[block]))
            for position in torch.argsort(score, descending=True)[:quota].tolist():
                remove.add((block, position))
            removed[block] = quota
            cap[block] = min(cap[block], quota + 1)
    order = sorted(((float(s), b, p) for b, score in enumerate(removal_scores) for p, s in enumerate(score)),
                   key=lambda item: (-item[0], item[1], item[2]))
    for _, block, position in order:
        if len(remove) >= to_remove:
            break
        if (block, position) not in remove and removed[block] < cap[block]:
            remove.add((block, position))
            removed[block] += 1
    return [[ids[p] for p in range(len(ids)) if (b, p) not in remove] for b, ids in enumerate(head_ids)]


def select_tokens(keep_scores: Sequence[torch.Tensor | None], ratio: float,
                  min_keep: int = 1) -> list[list[int] | None]:
    """Kept K/V positions per block after dropping `ratio` of all non-class positions globally.

    Position 0 (class token) is always kept, and every block keeps `min_keep` patch positions.
    A block scored None (one without heads: it has no keys or values) is left out.
    """
    check_ratio("token", ratio)
    if ratio == 0:
        return [None] * len(keep_scores)
    candidates = sorted(((float(s), b, p) for b, score in enumerate(keep_scores) if score is not None
                         for p, s in enumerate(score) if p > 0), key=lambda item: (item[0], item[1], item[2]))
    to_drop = round(ratio * len(candidates))
    left = [0 if score is None else len(score) - 1 for score in keep_scores]
    dropped: set[tuple[int, int]] = set()
    for _, block, position in candidates:
        if len(dropped) >= to_drop:
            break
        if left[block] > min_keep:
            dropped.add((block, position))
            left[block] -= 1
    return [None if score is None else [p for p in range(len(score)) if (b, p) not in dropped]
            for b, score in enumerate(keep_scores)]


def select_channels(keep_scores: Sequence[torch.Tensor], channel_ids: Sequence[Sequence[int]], ratio: float,
                    allocation: str = "global", total_channels: int | None = None,
                    multiple: int = 1) -> list[list[int]]:
    """Kept original MLP channel numbers per block after removing `ratio` of all channels.

    "per-block" removes the same share in every block; "normalized" ranks all channels
    together after dividing each block's scores by their mean (so that blocks with larger
    activations do not keep everything); any other allocation ranks the raw scores together.
    Every block keeps at least `multiple` channels, and each block's count is rounded to a
    multiple of `multiple` (runtimes' kernels prefer widths of 8 or 16). `total_channels`
    (default: those present) is what the ratio is a fraction of. Higher score stays.
    """
    check_ratio("MLP channel", ratio)
    if multiple < 1:
        raise InputError(f"the channel multiple must be >= 1, got {multiple}")
    present = [len(ids) for ids in channel_ids]
    total = total_channels or sum(present)
    target = max(round((1 - ratio) * total), multiple * len(present))
    if allocation == "per-block":
        counts = [target / len(present)] * len(present)
    else:
        scores = [s / s.mean().clamp_min(1e-12) for s in keep_scores] if allocation == "normalized" else keep_scores
        ranked = sorted(((float(s), b, p) for b, score in enumerate(scores) for p, s in enumerate(score)),
                        key=lambda item: (-item[0], item[1], item[2]))
        counts = [0] * len(present)
        for _, block, _ in ranked[:target]:
            counts[block] += 1
    kept_counts = [min(present[block], max(multiple, multiple * round(counts[block] / multiple)))
                   for block in range(len(present))]
    kept = []
    for score, ids, count in zip(keep_scores, channel_ids, kept_counts):
        best = sorted(torch.argsort(score, descending=True, stable=True)[:count].tolist())
        kept.append([ids[p] for p in best])
    return kept


def check_channels_removed(kept: Sequence[Sequence[int]], channel_ids: Sequence[Sequence[int]], ratio: float,
                           multiple: int) -> None:
    """Refuse a final plan asked to remove `ratio` of the MLP channels that keeps them all (the
    rounding to whole channels, or to `multiple`, took every removal back): it would say
    `ratio` and remove nothing, a silent wrong number in every row after it. Not for a ratio
    search, whose probes may round to nothing on their way to the target."""
    present = [len(ids) for ids in channel_ids]
    if ratio > 0 and [len(k) for k in kept] == present:
        rounding = f"to a multiple of {multiple}" if multiple > 1 else "to whole channels"
        raise InputError(f"rounding each block's MLP channels {rounding} keeps all of them (blocks of "
                         f"{', '.join(map(str, sorted(set(present))))} channels): {ratio:g} of them cannot be "
                         "removed so; choose a larger ratio" + (" or a smaller multiple" if multiple > 1 else ""))
