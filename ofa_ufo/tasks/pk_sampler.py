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
from typing import Any

import numpy as np

__all__ = ["PKSource", "pk_batches"]


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


class PKSource:
    """A training source drawn in identity chunks: draw ``i`` of epoch ``i // len(self)`` walks
    that epoch's ``pk_batches(identities, p=1, k)`` (every identity's images in chunks of K, the
    chunks shuffled), so K consecutive draws starting at a multiple of K are K images of one
    identity. A trainer taking ``P * K`` draws per step at offsets that are multiples of K
    therefore gets P identity chunks of K images each (an identity may rarely fill two chunks).

    Same interface as the trainer's list source: ``task``, ``examples``, ``len()``, ``draw(i)``.
    """

    def __init__(self, task: str, examples: Sequence[dict[str, Any]], identities: Sequence[Hashable], k: int,
                 seed: int) -> None:
        if len(examples) != len(identities):
            raise ValueError(f"{len(examples)} examples but {len(identities)} identities")
        examples = examples if isinstance(examples, Sequence) else list(examples)  # a lazy Sequence stays lazy
        self.task, self.examples, self.identities, self.k, self.seed = task, examples, list(identities), k, seed
        self._epoch, self._order = -1, []  # the flattened index order of the cached epoch
        self._length = len(self._order_of(0))

    def __len__(self) -> int:
        """Draws per epoch (identities with fewer than K images are topped up, a ragged tail dropped)."""
        return self._length

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            batches = pk_batches(self.identities, p=1, k=self.k, seed=self.seed, epoch=epoch)
            self._epoch, self._order = epoch, [index for batch in batches for index in batch]
        return self._order

    def draw(self, i: int) -> dict[str, Any]:
        epoch, position = divmod(i, self._length)
        return self.examples[self._order_of(epoch)[position]]
