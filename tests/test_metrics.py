"""Tests for amg.train.metrics: hand-worked cases, a loop-based reference, input errors, distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amg.train.metrics import RankMetrics, evaluate_rank, pairwise_distance

# --------------------------------------------------------------------------- hand-worked cases
# One query: pid 1, camera 0. Gallery of 5 whose distances sort as indices 1, 3, 0, 4, 2.
DIST = np.array([[0.3, 0.1, 0.5, 0.2, 0.4]])
Q_PID, Q_CAM = np.array([1]), np.array([0])
# Gallery pids in gallery order; in rank order (1..5) they read 2, 1, 3, 1, 1.
G_PID = np.array([3, 2, 1, 1, 1])
G_CAM = np.array([1, 1, 1, 1, 1])


def _eval(g_pids=G_PID, g_cams=G_CAM, dist=DIST, q_pids=Q_PID, q_cams=Q_CAM, **kw) -> RankMetrics:
    return evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, **kw)


def test_hand_worked_basic():
    # Rank order pids: 2, 1, 3, 1, 1 -> positives at ranks 2, 4, 5.
    # CMC = [0, 1, 1, 1, 1]; AP = (1/2 + 2/4 + 3/5) / 3 = 1.6 / 3; INP = 3 / 5.
    m = _eval(max_rank=5)
    np.testing.assert_allclose(m.cmc, [0, 1, 1, 1, 1])
    assert m.cmc.dtype == np.float64
    assert m.mAP == pytest.approx(1.6 / 3)
    assert m.mINP == pytest.approx(0.6)
    assert (m.num_queries, m.num_skipped) == (1, 0)
    assert m.as_dict() == pytest.approx({"rank1": 0.0, "rank5": 1.0, "mAP": 1.6 / 3, "mINP": 0.6})


def test_same_pid_same_camera_is_excluded_but_same_camera_negative_is_kept():
    # Gallery index 3 (rank 2, pid 1) moves to the query's camera 0 -> removed.
    # Gallery index 1 (rank 1, pid 2) also moves to camera 0 but has another pid -> stays a negative.
    # Rank order: 2, 3, 1, 1 -> positives at ranks 3, 4.
    # CMC = [0, 0, 1, 1, 1]; AP = (1/3 + 2/4) / 2 = 5/12; INP = 2/4.
    m = _eval(g_cams=np.array([1, 0, 1, 0, 1]), max_rank=5)
    np.testing.assert_allclose(m.cmc, [0, 0, 1, 1, 1])
    assert m.mAP == pytest.approx(5 / 12)
    assert m.mINP == pytest.approx(0.5)


def test_junk_is_excluded():
    # Gallery index 1 (rank 1) becomes junk (pid -1) -> removed. Rank order: 1, 3, 1, 1.
    # Positives at ranks 1, 3, 4: CMC = [1, 1, 1, 1, 1]; AP = (1/1 + 2/3 + 3/4) / 3 = 29/36; INP = 3/4.
    m = _eval(g_pids=np.array([3, -1, 1, 1, 1]), max_rank=5)
    np.testing.assert_allclose(m.cmc, [1, 1, 1, 1, 1])
    assert m.mAP == pytest.approx(29 / 36)
    assert m.mINP == pytest.approx(0.75)


def test_distractor_counts_as_negative():
    # Same as the junk case but with pid 0: it stays in the gallery, so the numbers are the basic ones.
    m = _eval(g_pids=np.array([3, 0, 1, 1, 1]), max_rank=5)
    assert m.rank(1) == 0.0
    assert m.mAP == pytest.approx(1.6 / 3)
    assert m.mINP == pytest.approx(0.6)


def test_query_without_valid_positive_is_skipped_and_counted():
    # Query 2 (pid 7) has only a same-camera match (gallery index 0 -> pid 7, camera 0): skipped.
    # Gallery index 0 is still a negative for query 1, which keeps the basic numbers.
    dist = np.vstack([DIST, DIST])
    m = _eval(
        dist=dist,
        q_pids=np.array([1, 7]),
        q_cams=np.array([0, 0]),
        g_pids=np.array([7, 2, 1, 1, 1]),
        g_cams=np.array([0, 1, 1, 1, 1]),
        max_rank=5,
    )
    assert (m.num_queries, m.num_skipped) == (1, 1)
    np.testing.assert_allclose(m.cmc, [0, 1, 1, 1, 1])
    assert m.mAP == pytest.approx(1.6 / 3)


def test_all_queries_skipped_raises():
    with pytest.raises(ValueError, match="no query has a valid positive"):
        _eval(q_pids=np.array([42]))


def test_fewer_candidates_than_max_rank_pads_cmc():
    # 5 gallery entries, max_rank 10: CMC stays at its final value (1) past rank 5.
    m = _eval(max_rank=10)
    np.testing.assert_allclose(m.cmc, [0] + [1] * 9)
    assert m.rank(10) == 1.0
    assert set(m.as_dict()) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    with pytest.raises(ValueError, match="max_rank"):
        m.rank(11)
    with pytest.raises(ValueError, match=r"rank k must be in \[1, 10\].*got 0"):
        m.rank(0)


def test_ties_are_pessimistic_and_order_independent():
    # Positive (pid 1) tied with a negative (pid 2) ranks second whatever the gallery order:
    # CMC = [0, 1]; AP = 1/2; INP = 1/2.
    for g_pids in (np.array([1, 2]), np.array([2, 1])):
        m = evaluate_rank(np.array([[0.1, 0.1]]), [1], g_pids, [0], [1, 1], max_rank=2)
        np.testing.assert_allclose(m.cmc, [0, 1])
        assert m.mAP == pytest.approx(0.5)
        assert m.mINP == pytest.approx(0.5)


def test_infinite_distance_positive_ranks_last():
    # Positive at +inf behind 2 negatives (and 1 junk entry that must not be counted): rank 3.
    m = evaluate_rank(np.array([[np.inf, 0.1, 0.2, 0.3]]), [1], [1, 2, 3, -1], [0], [1, 1, 1, 1], max_rank=3)
    np.testing.assert_allclose(m.cmc, [0, 0, 1])
    assert m.mAP == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- reference agreement
def reference_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """torchreid's eval_market1501 logic, one query at a time, plus the pid -1 junk rule."""
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        remove = ((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])) | (g_pids[order] == -1)
        matches = (g_pids[order] == q_pids[q])[~remove].astype(np.int64)
        if not matches.any():
            continue
        cum = matches.cumsum()
        cmc = np.minimum(cum, 1).astype(np.float64)
        cmc = np.concatenate([cmc, np.full(max(0, max_rank - len(cmc)), cmc[-1])])[:max_rank]
        all_cmc.append(cmc)
        precision = cum / np.arange(1, len(cum) + 1)
        all_ap.append((precision * matches).sum() / matches.sum())
        last = np.flatnonzero(matches).max()
        all_inp.append(cum[last] / (last + 1.0))
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), float(np.mean(all_inp)), len(all_ap)


def _random_problem(seed: int, nq: int = 60, ng: int = 400, num_ids: int = 25):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, num_ids + 1, nq)
    g_pids = rng.integers(-1, num_ids + 1, ng)  # includes junk (-1) and distractors (0)
    q_cams, g_cams = rng.integers(0, 4, nq), rng.integers(0, 4, ng)
    q_pids[:3] = num_ids + 5  # pids absent from the gallery: skipped queries
    dist = rng.random((nq, ng))
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_loop_reference(seed):
    dist, q_pids, g_pids, q_cams, g_cams = _random_problem(seed)
    assert (g_pids == 0).any() and (g_pids == -1).any()
    cmc, mAP, mINP, n = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    m = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, chunk_size=7)
    np.testing.assert_allclose(m.cmc, cmc, atol=1e-6)
    assert m.mAP == pytest.approx(mAP, abs=1e-6)
    assert m.mINP == pytest.approx(mINP, abs=1e-6)
    assert m.num_queries == n
    assert m.num_skipped == len(q_pids) - n >= 3


def test_matches_reference_with_small_gallery():
    # 8 gallery entries < max_rank 10: exercises CMC padding against the reference.
    dist, q_pids, g_pids, q_cams, g_cams = _random_problem(7, nq=30, ng=8, num_ids=3)
    cmc, mAP, mINP, n = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    m = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, chunk_size=4)
    np.testing.assert_allclose(m.cmc, cmc, atol=1e-6)
    assert (m.mAP, m.mINP, m.num_queries) == (pytest.approx(mAP, abs=1e-6), pytest.approx(mINP, abs=1e-6), n)


def test_chunk_size_does_not_change_results():
    dist, q_pids, g_pids, q_cams, g_cams = _random_problem(11)
    results = [
        evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=c).as_dict() for c in (1, 7, 60, 10_000)
    ]
    for r in results[1:]:
        assert r == pytest.approx(results[0], abs=1e-12)


# --------------------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"q_pids": np.array([1, 1])}, "q_pids"),
        ({"q_cams": np.array([0, 0])}, "q_camids"),
        ({"g_pids": G_PID[:4]}, "g_pids"),
        ({"g_cams": G_CAM[:4]}, "g_camids"),
        ({"dist": DIST[0]}, "2-D"),
        ({"dist": np.array([[0.3, np.nan, 0.5, 0.2, 0.4]])}, "NaN"),
        ({"max_rank": 0}, "max_rank"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _eval(**kwargs)


# --------------------------------------------------------------------------- distances
def test_pairwise_distance_euclidean_is_squared_l2():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(7, 16, generator=g), torch.randn(11, 16, generator=g)
    expected = ((q[:, None, :] - gal[None, :, :]) ** 2).sum(-1).numpy()
    d = pairwise_distance(q, gal)
    assert d.shape == (7, 11) and d.dtype == np.float32
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-4)
    assert (pairwise_distance(q, q).diagonal() >= 0).all()


def test_pairwise_distance_cosine():
    g = torch.Generator().manual_seed(1)
    q, gal = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(9, 8, generator=g, dtype=torch.float64)
    qn, gn = q.numpy(), gal.numpy()
    expected = 1 - (qn @ gn.T) / np.linalg.norm(qn, axis=1)[:, None] / np.linalg.norm(gn, axis=1)[None, :]
    d = pairwise_distance(q, 3.0 * gal, metric="cosine")  # scale-invariant
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, expected, atol=1e-12)


def test_pairwise_distance_errors():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="unknown metric"):
        pairwise_distance(x, x, metric="manhattan")
    with pytest.raises(ValueError, match="feature dims"):
        pairwise_distance(x, torch.zeros(2, 3))


def test_per_query_values_average_to_the_metrics():
    rng = np.random.default_rng(3)
    dist = rng.random((40, 60))
    q_pids, g_pids = rng.integers(0, 6, 40), rng.integers(0, 6, 60)
    metrics = evaluate_rank(dist, q_pids, g_pids, np.zeros(40), np.ones(60), chunk_size=7)
    assert len(metrics.query_ap) == metrics.num_queries
    assert metrics.query_ap.mean() == pytest.approx(metrics.mAP)
    assert (metrics.query_first_rank == 1).mean() == pytest.approx(metrics.rank(1))


def test_paired_bootstrap_separates_a_real_difference_from_noise():
    from amg.train.accuracy_difference import paired_difference

    rng = np.random.default_rng(4)
    q_pids, g_pids = np.arange(200) % 20, np.arange(400) % 20
    truth = (q_pids[:, None] == g_pids[None, :]).astype(float)
    noisy = rng.random((200, 400))
    good = evaluate_rank(noisy - 0.5 * truth, q_pids, g_pids, np.zeros(200), np.ones(400))
    bad = evaluate_rank(noisy - 0.05 * truth, q_pids, g_pids, np.zeros(200), np.ones(400))
    better = paired_difference(bad, good, "mAP")
    assert better.delta > 0 and better.low > 0 and better.decided
    same = paired_difference(good, good, "rank1")
    assert same.delta == 0 and same.low == same.high == 0 and not same.decided
    # a small random change on a few queries: the interval straddles 0
    shuffled = evaluate_rank(noisy - 0.5 * truth + 0.02 * rng.random((200, 400)), q_pids, g_pids,
                             np.zeros(200), np.ones(400))
    jitter = paired_difference(good, shuffled, "mAP")
    assert jitter.low < 0 < jitter.high or jitter.delta == 0
    with pytest.raises(ValueError, match="the same queries"):
        paired_difference(good, evaluate_rank(noisy[:50], q_pids[:50], g_pids, np.zeros(50), np.ones(400)), "mAP")
