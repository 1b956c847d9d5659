"""Re-ID ranking metrics (CMC, mAP, mINP) and query/gallery distance matrices.

Protocol (Market-1501, as torchreid's ``eval_market1501``): for each query, gallery
entries with the query's pid *and* camera are removed, gallery entries with pid -1
(junk) are removed for every query, pid 0 (distractors) stay as ordinary negatives,
and queries left with no positive are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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
    # per valid query, in query order: its AP and the rank of its first positive (paired
    # comparisons of two models on the same queries: `amg.train.accuracy_difference`)
    query_ap: np.ndarray | None = None
    query_first_rank: np.ndarray | None = None

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
    dist = _as_distances(distmat)
    num_q, num_g = dist.shape
    q_pids, q_camids = _as_ids(q_pids, "q_pids", num_q, "rows"), _as_ids(q_camids, "q_camids", num_q, "rows")
    g_pids, g_camids = _as_ids(g_pids, "g_pids", num_g, "columns"), _as_ids(g_camids, "g_camids", num_g, "columns")
    if max_rank < 1:
        raise InputError(f"max_rank must be >= 1, got {max_rank}")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")

    junk = g_pids == JUNK_PID
    totals = _RankTotals(max_rank)
    for start in range(0, num_q, chunk_size):
        chunk = slice(start, start + chunk_size)
        _reject_nan(dist[chunk], first_row=start)
        totals.add(_rank_positives(dist[chunk], q_pids[chunk], q_camids[chunk], g_pids, g_camids, junk))
    return totals.metrics(num_q)


def _as_distances(distmat: ArrayLike) -> np.ndarray:
    dist = np.asarray(distmat)
    if dist.ndim != 2:
        raise InputError(f"distmat must be 2-D [num_query, num_gallery], got shape {dist.shape}")
    if not np.issubdtype(dist.dtype, np.floating):
        return dist.astype(np.float64)
    if dist.dtype == np.float16:
        return dist.astype(np.float32)  # numpy has no fast float16 sort
    return dist


def _reject_nan(dist: np.ndarray, first_row: int) -> None:
    # A NaN compares false with everything, so it would silently corrupt the ranks.
    if np.isnan(dist).any():
        bad = first_row + int(np.flatnonzero(np.isnan(dist).any(axis=1))[0])
        raise InputError(f"distmat contains NaN (first in query row {bad})")


class _ChunkRanks(NamedTuple):
    """The valid positives of a chunk of queries, grouped by query row and sorted by rank within it."""

    rows: np.ndarray  # query row (within the chunk) of each positive
    nth: np.ndarray  # 1-based index of the positive among its row's positives
    ranks: np.ndarray  # 1-based rank among the row's valid gallery entries
    n_pos: np.ndarray  # [chunk rows] number of positives per row
    row_start: np.ndarray  # [chunk rows + 1] offset of each row's first positive; the last is the total


def _rank_positives(
    dist: np.ndarray,
    q_pids: np.ndarray,
    q_camids: np.ndarray,
    g_pids: np.ndarray,
    g_camids: np.ndarray,
    junk: np.ndarray,
) -> _ChunkRanks:
    """Rank every valid positive of the queries in ``dist`` (a chunk of distmat rows)."""
    same_pid = q_pids[:, None] == g_pids[None, :]
    same_cam = q_camids[:, None] == g_camids[None, :]
    pos = same_pid & ~same_cam & ~junk  # junk check matters only for a query with pid -1
    neg = ~same_pid & ~junk
    n_pos = pos.sum(axis=1)

    rows, cols = np.nonzero(pos)  # row-major: grouped by row
    pos_d = dist[rows, cols]
    order = np.lexsort((pos_d, rows))  # within each row, positives by increasing distance
    rows, pos_d = rows[order], pos_d[order]
    row_start = np.concatenate(([0], np.cumsum(n_pos)))
    nth = np.arange(len(rows)) - row_start[rows] + 1

    negs_before = _negatives_before(dist, neg, rows, pos_d, row_start)
    return _ChunkRanks(rows=rows, nth=nth, ranks=nth + negs_before, n_pos=n_pos, row_start=row_start)


def _negatives_before(
    dist: np.ndarray, neg: np.ndarray, rows: np.ndarray, pos_d: np.ndarray, row_start: np.ndarray
) -> np.ndarray:
    """Per positive (grouped by row as ``row_start`` says), the number of negatives ranked at or before it."""
    # Only negatives can push a positive down; sorting just them (others -> +inf) lets a
    # binary search count "negatives at or before this positive" without an argsort.
    neg_sorted = np.sort(np.where(neg, dist, np.inf), axis=1)
    counts = np.empty(len(rows), dtype=np.int64)
    for r in np.flatnonzero(np.diff(row_start)):
        s, e = row_start[r], row_start[r + 1]
        # side="right": a negative tied with the positive ranks first (pessimistic).
        counts[s:e] = np.searchsorted(neg_sorted[r], pos_d[s:e], side="right")
    # +inf padding would be counted for a positive at distance +inf; cap at the real negatives.
    return np.minimum(counts, neg.sum(axis=1)[rows])


class _RankTotals:
    """Running sums over the chunks; the metrics are averaged once at the end."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        # index max_rank+1 collects "first positive beyond max_rank"
        self.first_hist = np.zeros(max_rank + 2, dtype=np.int64)
        self.ap_sum = self.inp_sum = 0.0
        self.num_valid = 0
        self.query_ap: list[np.ndarray] = []
        self.query_first_rank: list[np.ndarray] = []

    def add(self, chunk: _ChunkRanks) -> None:
        valid = chunk.n_pos > 0
        n_pos = chunk.n_pos[valid]
        # AP = mean over positives of precision at that positive (i-th positive at rank_i: i / rank_i).
        precision_sum = np.bincount(chunk.rows, weights=chunk.nth / chunk.ranks, minlength=len(chunk.n_pos))
        query_ap = precision_sum[valid] / n_pos
        self.ap_sum += float(query_ap.sum())
        first_rank = chunk.ranks[chunk.row_start[:-1][valid]]
        self.query_ap.append(query_ap)
        self.query_first_rank.append(first_rank)
        last_rank = chunk.ranks[chunk.row_start[1:][valid] - 1]
        self.inp_sum += float((n_pos / last_rank).sum())
        self.first_hist += np.bincount(np.minimum(first_rank, self.max_rank + 1), minlength=self.max_rank + 2)
        self.num_valid += int(valid.sum())

    def metrics(self, num_queries: int) -> RankMetrics:
        if self.num_valid == 0:
            raise InputError(
                f"no query has a valid positive in the gallery (all {num_queries} queries skipped): "
                "check that query pids appear in the gallery under a different camera"
            )
        cmc = np.cumsum(self.first_hist[1 : self.max_rank + 1]) / self.num_valid
        cmc.setflags(write=False)  # RankMetrics is frozen; keep its array immutable too
        return RankMetrics(
            cmc=cmc,
            mAP=self.ap_sum / self.num_valid,
            mINP=self.inp_sum / self.num_valid,
            num_queries=self.num_valid,
            num_skipped=num_queries - self.num_valid,
            query_ap=np.concatenate(self.query_ap),
            query_first_rank=np.concatenate(self.query_first_rank),
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
