"""P x K identity sampler for metric-learning losses (triplet loss needs positives in every batch)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from amg.errors import InputError


class PKSampler(Sampler[int]):
    """Yield indices in consecutive groups of P*K: P distinct identities with K instances each.

    One epoch visits every identity once, in a shuffled order, so it has ceil(N/P) groups;
    the last group is topped up with other identities so it too holds P distinct ones.
    An identity with fewer than K images is sampled with replacement. The order depends only
    on (seed, epoch), so call ``set_epoch`` each epoch as with ``DistributedSampler``; use
    ``DataLoader(batch_size=sampler.batch_size, sampler=sampler)`` to keep groups as batches.
    """

    def __init__(self, labels: Sequence[int], num_identities: int, num_instances: int, seed: int = 0) -> None:
        if num_identities < 1 or num_instances < 1:
            raise InputError(f"PKSampler needs P >= 1 and K >= 1, got P={num_identities}, K={num_instances}")
        if seed < 0:
            raise InputError(f"PKSampler seed must be >= 0, got {seed}")  # numpy SeedSequence rejects it
        by_label: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            by_label.setdefault(int(label), []).append(index)
        if len(by_label) < num_identities:
            raise InputError(
                f"PKSampler needs at least P={num_identities} identities per batch, "
                f"but the labels contain only {len(by_label)}"
            )
        # Sorted so the shuffle depends on (seed, epoch) only, not on the order labels arrive in.
        self._pools = [np.asarray(by_label[label]) for label in sorted(by_label)]
        self.num_identities = num_identities
        self.num_instances = num_instances
        self.seed = seed
        self.epoch = 0
        self.num_batches = math.ceil(len(self._pools) / num_identities)

    @property
    def batch_size(self) -> int:
        return self.num_identities * self.num_instances

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self._pools))
        p, k = self.num_identities, self.num_instances
        for b in range(self.num_batches):
            group = order[b * p : (b + 1) * p]
            if len(group) < p:
                # Top up from identities already seen this epoch: the batch keeps P distinct ids.
                group = np.concatenate([group, rng.choice(order[: b * p], p - len(group), replace=False)])
            for identity in group:
                pool = self._pools[identity]
                yield from (int(i) for i in rng.choice(pool, k, replace=len(pool) < k))


def rank_share(num_identities: int, num_instances: int, rank: int, world_size: int) -> list[int]:
    """Positions in a P x K batch that process `rank` of `world_size` trains on (data parallel):
    identities rank, rank + W, ... with all K instances each. Every share is itself a PK batch
    of P/W identities (the triplet loss finds positives in it); the shares are disjoint and
    together make the batch."""
    if num_identities % world_size:
        raise InputError(f"a PK batch of P={num_identities} identities cannot be split evenly over "
                         f"{world_size} processes: P must be a multiple of the number of processes")
    return [identity * num_instances + instance for identity in range(rank, num_identities, world_size)
            for instance in range(num_instances)]
