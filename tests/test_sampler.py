"""PKSampler: P distinct identities x K instances per group, deterministic per (seed, epoch)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from amg.data.sampler import PKSampler

# 7 identities with 1..5 images each (some below K), shuffled so label order != index order.
LABELS = [3, 9, 3, 1, 4, 9, 3, 20, 4, 3, 1, 9, 5, 3, 20, 6]
P, K = 3, 4


def groups(sampler: PKSampler) -> list[list[int]]:
    indices = list(sampler)
    size = sampler.batch_size
    assert len(indices) % size == 0
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_every_group_has_p_distinct_identities_times_k() -> None:
    sampler = PKSampler(LABELS, P, K, seed=1)
    for group in groups(sampler):
        per_label = Counter(LABELS[i] for i in group)
        assert len(per_label) == P and set(per_label.values()) == {K}
        # The K instances of one identity are consecutive (the standard triplet-batch layout).
        assert all(len({LABELS[i] for i in group[j : j + K]}) == 1 for j in range(0, len(group), K))


def test_epoch_covers_every_identity() -> None:
    sampler = PKSampler(LABELS, P, K)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        assert {LABELS[i] for i in sampler} == set(LABELS)
    assert sampler.num_batches == 3  # ceil(7 identities / P=3)


def test_len_matches_iteration() -> None:
    for p, k in [(1, 1), (2, 3), (3, 4), (7, 2)]:
        sampler = PKSampler(LABELS, p, k)
        assert len(sampler) == len(list(sampler)) == sampler.num_batches * p * k


def test_deterministic_per_seed_and_epoch() -> None:
    a, b = PKSampler(LABELS, P, K, seed=5), PKSampler(LABELS, P, K, seed=5)
    assert list(a) == list(b) == list(a)  # re-iterating the same epoch repeats it
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    epoch0 = list(PKSampler(LABELS, P, K, seed=5))
    assert list(a) != epoch0  # a new epoch reshuffles
    assert list(PKSampler(LABELS, P, K, seed=6)) != epoch0


def test_small_identities_sampled_with_replacement() -> None:
    labels = [0, 1, 1, 2, 2, 2, 2, 2]
    sampler = PKSampler(labels, 3, 4)
    indices = list(sampler)
    assert indices.count(0) == 4  # the single image of identity 0 is repeated K times
    big = [i for i in indices if labels[i] == 2]
    assert len(set(big)) == 4  # identity 2 has >= K images: no repeats


def test_too_few_identities() -> None:
    with pytest.raises(ValueError, match=r"P=8.*only 7"):
        PKSampler(LABELS, 8, K)
    with pytest.raises(ValueError, match="needs P >= 1 and K >= 1, got P=0"):
        PKSampler(LABELS, 0, K)
    with pytest.raises(ValueError, match=r"needs P >= 1 and K >= 1, got P=\d+, K=0"):
        PKSampler(LABELS, P, 0)


def test_accepts_tensor_labels_and_feeds_a_dataloader() -> None:
    sampler = PKSampler(torch.tensor(LABELS), P, K, seed=2)
    loader = torch.utils.data.DataLoader(torch.tensor(LABELS), batch_size=sampler.batch_size, sampler=sampler)
    batches = list(loader)
    assert len(batches) == sampler.num_batches
    for batch in batches:
        assert sorted(Counter(batch.tolist()).values()) == [K] * P
