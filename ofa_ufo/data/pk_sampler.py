"""P x K identity batches for metric learning (batch-hard triplet loss): P identities, K images each.

Deterministic per ``(seed, epoch)``, so every process of a multi-process run computes the same
batches and a resumed run replays the epoch it stopped in. One epoch goes through each
identity's images once (in chunks of K, shuffled), so identities with many images appear in
more batches, as in fast-reid's and torchreid's identity samplers.

Identities with fewer than K images are topped up by sampling their images with replacement,
so every batch keeps its P x K shape. An identity with a single image therefore fills its K
slots with copies of that image: after augmentation they are distinct views, but the triplet
loss has no positive pair from a different image. Filter such identities out beforehand if
that is not wanted.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["pk_batches"]


def _identity_chunks(indices: list[int], k: int, rng: np.random.Generator) -> list[list[int]]:
    """One identity's images shuffled (topped up to k with replacement) and cut into chunks of k."""
    if len(indices) < k:
        picked = rng.choice(indices, size=k, replace=True)
    else:
        picked = rng.permutation(indices)
    usable = len(picked) - len(picked) % k  # a last chunk shorter than k is dropped this epoch
    return [[int(i) for i in picked[start:start + k]] for start in range(0, usable, k)]


def pk_batches(identities: Sequence[Hashable], p: int, k: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of dataset indices, each P distinct identities x K images, for one epoch.

    ``identities[i]`` is the identity of dataset item ``i`` (any hashable). Each batch lists
    the K indices of its first identity, then the K of the second, and so on. Batches are
    drawn until fewer than P identities have chunks left; the rest wait for the next epoch.
    ``seed`` and ``epoch`` are non-negative. Raises ``ValueError`` when there are fewer than
    P identities.
    """
    if p < 1 or k < 1:
        raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
    members: dict[Hashable, list[int]] = {}
    for index, identity in enumerate(identities):
        members.setdefault(identity, []).append(index)
    if len(members) < p:
        raise ValueError(f"a P x K batch needs at least p={p} identities, found {len(members)}")
    rng = np.random.default_rng([seed, epoch])
    chunks = [_identity_chunks(indices, k, rng) for indices in members.values()]  # per identity, first-seen order
    available = list(range(len(chunks)))  # identities with chunks left (all have at least one)
    batches = []
    while len(available) >= p:
        picks = sorted(rng.choice(len(available), size=p, replace=False).tolist(), reverse=True)
        batches.append([index for pick in picks for index in chunks[available[pick]].pop()])
        for pick in picks:  # descending, so swap-removal leaves the other picks in place
            if not chunks[available[pick]]:
                available[pick] = available[-1]
                available.pop()
    return batches
