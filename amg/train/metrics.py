"""Re-ID ranking metrics (CMC, mAP, mINP) and query/gallery distance matrices.

Protocol (Market-1501, as torchreid's ``eval_market1501``): for each query, gallery
entries with the query's pid *and* camera are removed, gallery entries with pid -1
(junk) are removed for every query, pid 0 (distractors) stay as ordinary negatives,
and queries left with no positive are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from amg.errors import InputError

__all__ = ["RankMetrics", "evaluate_rank", "pairwise_distance"]

JUNK_PID = -1


# eq=False: the generated __eq__/__hash__ would compare/hash the ndarray and raise.
@dataclass(frozen=True, eq=False)
class RankMetrics:
    """Ranking metrics averaged over the valid (non-skipped) queries."""

    cmc: np.ndarray  # float64 [max_rank]; cmc[k-1] = fraction of queries with a positive in the top k
    mAP: float
    mINP: float  # mean over queries of num_positives / rank of the hardest positive (Ye et al. 2021)
    num_queries: int  # valid queries evaluated
    num_skipped: int  # queries with no valid positive

    @property
    def max_rank(self) -> int:
        return len(self.cmc)

    def rank(self, k: int) -> float:
        """CMC at rank ``k`` (1-based)."""
        if not 1 <= k <= self.max_rank:
            raise InputError(f"rank k must be in [1, {self.max_rank}] (max_rank of this evaluation), got {k}")
        return float(self.cmc[k - 1])

    def as_dict(self) -> dict[str, float]:
        out = {f"rank{k}": self.rank(k) for k in (1, 5, 10) if k <= self.max_rank}
        out["mAP"] = self.mAP
        out["mINP"] = self.mINP
        return out


def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 10,
    chunk_size: int = 512,
) -> RankMetrics:
    """Market-1501 evaluation: per query, drop gallery entries with the same pid and camera and all pid -1 junk.

    ``distmat`` is [Nq, Ng], smaller = more similar. Ranks are 1-based among the query's
    valid gallery entries. Ties: a positive tied with a negative is ranked after it
    (pessimistic, independent of gallery order); tied positives take consecutive ranks,
    so every metric is deterministic. Without positive/negative ties the result equals
    torchreid's. CMC is cumulative and saturates at 1 at the first positive, so queries
    with fewer than ``max_rank`` candidates are padded with their final value.

    Memory is O(chunk_size * Ng): queries are processed ``chunk_size`` rows at a time.
    """
    dist = np.asarray(distmat)
    if dist.ndim != 2:
        raise InputError(f"distmat must be 2-D [num_query, num_gallery], got shape {dist.shape}")
    if not np.issubdtype(dist.dtype, np.floating):
        dist = dist.astype(np.float64)
    elif dist.dtype == np.float16:
        dist = dist.astype(np.float32)  # numpy has no fast float16 sort
    num_q, num_g = dist.shape
    q_pids, q_camids = _as_ids(q_pids, "q_pids", num_q, "rows"), _as_ids(q_camids, "q_camids", num_q, "rows")
    g_pids, g_camids = _as_ids(g_pids, "g_pids", num_g, "columns"), _as_ids(g_camids, "g_camids", num_g, "columns")
    if max_rank < 1:
        raise InputError(f"max_rank must be >= 1, got {max_rank}")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")

    junk = g_pids == JUNK_PID
    first_hist = np.zeros(max_rank + 2, dtype=np.int64)  # index max_rank+1 collects "first positive beyond max_rank"
    ap_sum = inp_sum = 0.0
    num_valid = 0

    for start in range(0, num_q, chunk_size):
        d = dist[start : start + chunk_size]
        if np.isnan(d).any():
            bad = start + int(np.flatnonzero(np.isnan(d).any(axis=1))[0])
            raise InputError(f"distmat contains NaN (first in query row {bad})")
        same_pid = q_pids[start : start + chunk_size, None] == g_pids[None, :]
        same_cam = q_camids[start : start + chunk_size, None] == g_camids[None, :]
        pos = same_pid & ~same_cam & ~junk  # junk check matters only for a query with pid -1
        neg = ~same_pid & ~junk
        n_pos = pos.sum(axis=1)
        n_neg = neg.sum(axis=1)

        # Only negatives can push a positive down; sorting just them (others -> +inf) lets a
        # binary search count "negatives at or before this positive" without an argsort.
        neg_sorted = np.sort(np.where(neg, d, np.inf), axis=1)

        rows, cols = np.nonzero(pos)  # row-major: grouped by row
        pos_d = d[rows, cols]
        order = np.lexsort((pos_d, rows))  # within each row, positives by increasing distance
        rows, pos_d = rows[order], pos_d[order]
        row_start = np.concatenate(([0], np.cumsum(n_pos)))
        nth = np.arange(len(rows)) - row_start[rows] + 1  # 1-based index of the positive within its row

        negs_before = np.empty(len(rows), dtype=np.int64)
        for r in np.flatnonzero(n_pos):
            s, e = row_start[r], row_start[r + 1]
            # side="right": a negative tied with the positive ranks first (pessimistic).
            negs_before[s:e] = np.searchsorted(neg_sorted[r], pos_d[s:e], side="right")
        # +inf padding would be counted for a positive at distance +inf; cap at the real negatives.
        negs_before = np.minimum(negs_before, n_neg[rows])
        ranks = nth + negs_before

        valid = n_pos > 0
        # AP = mean over positives of precision at that positive (i-th positive at rank_i: i / rank_i).
        precision_sum = np.bincount(rows, weights=nth / ranks, minlength=len(n_pos))
        ap_sum += float((precision_sum[valid] / n_pos[valid]).sum())
        first_rank = ranks[row_start[:-1][valid]]
        last_rank = ranks[row_start[1:][valid] - 1]
        inp_sum += float((n_pos[valid] / last_rank).sum())
        first_hist += np.bincount(np.minimum(first_rank, max_rank + 1), minlength=max_rank + 2)
        num_valid += int(valid.sum())

    if num_valid == 0:
        raise InputError(
            f"no query has a valid positive in the gallery (all {num_q} queries skipped): "
            "check that query pids appear in the gallery under a different camera"
        )
    cmc = np.cumsum(first_hist[1 : max_rank + 1]) / num_valid
    cmc.setflags(write=False)  # RankMetrics is frozen; keep its array immutable too
    return RankMetrics(
        cmc=cmc,
        mAP=ap_sum / num_valid,
        mINP=inp_sum / num_valid,
        num_queries=num_valid,
        num_skipped=num_q - num_valid,
    )


def _as_ids(ids: ArrayLike, name: str, expected: int, axis: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != expected:
        raise InputError(f"{name} must be 1-D with one entry per distmat {axis} ({expected}), got shape {arr.shape}")
    return arr


def pairwise_distance(
    query_features: torch.Tensor, gallery_features: torch.Tensor, metric: str = "euclidean"
) -> np.ndarray:
    """[Nq, Ng] distance matrix as a numpy array (float32, or float64 for float64 input).

    ``euclidean`` is the *squared* Euclidean distance (same ranking, no sqrt; clamped at 0
    against round-off). ``cosine`` is ``1 - cosine similarity`` of L2-normalised features.
    """
    if query_features.ndim != 2 or gallery_features.ndim != 2:
        raise InputError(
            f"features must be 2-D [N, D], got query {tuple(query_features.shape)} "
            f"and gallery {tuple(gallery_features.shape)}"
        )
    if query_features.shape[1] != gallery_features.shape[1]:
        raise InputError(
            f"feature dims differ: query {query_features.shape[1]} vs gallery {gallery_features.shape[1]}"
        )
    dtype = torch.float64 if torch.float64 in (query_features.dtype, gallery_features.dtype) else torch.float32
    with torch.no_grad():
        q = query_features.detach().to(dtype)
        g = gallery_features.detach().to(dtype=dtype, device=q.device)
        if metric == "euclidean":
            # |q|^2 + |g|^2 - 2 q.g: one matmul instead of an [Nq, Ng, D] difference tensor.
            d = q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1)[None, :]
            d = d.addmm_(q, g.t(), alpha=-2.0).clamp_(min=0.0)
        elif metric == "cosine":
            d = 1.0 - F.normalize(q, dim=1) @ F.normalize(g, dim=1).t()
        else:
            raise InputError(f"unknown metric {metric!r}; expected 'euclidean' or 'cosine'")
    return d.cpu().numpy()
