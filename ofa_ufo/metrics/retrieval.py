"""Retrieval metrics of the AllInOne tasks: ReID ranking, face verification, product Recall@K.

* :func:`reid_metrics`: person / vehicle re-identification under the Market-1501 protocol
  (CMC rank-k, mAP, mINP), as in fast-reid / torchreid and the UFO AllInOne evaluator.
* :func:`verification_accuracy`: LFW-style 10-fold pair verification.
* :func:`recall_at_k`: Stanford Online Products Recall@K, every item querying all others.

``*_metric`` wrappers adapt them to the registry's ``metric(predictions, references)`` form:
predictions are embeddings (``list[float]`` or the pipeline's ``{"embedding": [...]}``) and
references the examples' ``meta`` dicts written by :mod:`ofa_ufo.data.loaders.reid`.

Ties in distance are broken by gallery order (a stable sort), so results are deterministic.
Distances: ``"cosine"`` (1 - cosine similarity of L2-normalised features, the default) or
``"euclidean"`` (features used as given).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "JUNK_IDENTITY", "recall_at_k", "recall_metric", "reid_metric", "reid_metrics", "verification_accuracy",
    "verification_metric",
]

Distance = Literal["cosine", "euclidean"]
JUNK_IDENTITY = -1  # Market-1501 "junk" boxes: never counted as a match nor as a miss
_CHUNK_ELEMENTS = 1 << 24  # distance-matrix entries held at once (128 MB of float64)


# --- shared helpers ------------------------------------------------------------------------------

def _matrix(feats: Any, name: str) -> np.ndarray:
    """Features as a finite float64 (N, D) array."""
    array = np.asarray(feats, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (items, dim) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _vector(values: Any, length: int, name: str) -> np.ndarray:
    """Integer labels (identity, camera) as an int64 (N,) array of the expected length."""
    array = np.asarray(values)
    if array.shape != (length,) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be {length} integers, got shape {array.shape} of {array.dtype}")
    return array.astype(np.int64)


def _normalise(feats: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def _distances(queries: np.ndarray, gallery: np.ndarray, distance: Distance) -> np.ndarray:
    """(Q, G) distances; cosine = 1 - cos, euclidean = L2."""
    if distance == "cosine":
        return 1.0 - _normalise(queries) @ _normalise(gallery).T
    if distance == "euclidean":
        squared = (queries**2).sum(1)[:, None] + (gallery**2).sum(1)[None, :] - 2.0 * queries @ gallery.T
        return np.sqrt(np.maximum(squared, 0.0))
    raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")


def _chunks(count: int, columns: int) -> list[slice]:
    """Row slices that keep a (rows, columns) distance block under the memory budget."""
    rows = max(1, _CHUNK_ELEMENTS // max(columns, 1))
    return [slice(start, min(start + rows, count)) for start in range(0, count, rows)]


def _check_ks(ks: Sequence[int], name: str) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or not all(isinstance(k, (int, np.integer)) and k >= 1 for k in ks):
        raise ValueError(f"{name} must be positive integers, got {ks!r}")
    return ks


# --- ReID: Market-1501 protocol ------------------------------------------------------------------

def _ranking_scores(matches: np.ndarray) -> tuple[int, float, float]:
    """(0-based position of the first match, AP, INP) of one query's ranked match flags."""
    positions = np.flatnonzero(matches)  # 0-based ranks of the true matches
    precision_at_hits = np.arange(1, len(positions) + 1) / (positions + 1)
    inverse_negative_penalty = len(positions) / (positions[-1] + 1)  # Ye et al.: |G| / R_hardest
    return int(positions[0]), float(precision_at_hits.mean()), float(inverse_negative_penalty)


def reid_metrics(
    query_feats: Any, gallery_feats: Any, query_ids: Any, gallery_ids: Any, query_cams: Any, gallery_cams: Any,
    ranks: Sequence[int] = (1, 5, 10), distance: Distance = "cosine",
) -> dict[str, float]:
    """CMC rank-k, mAP and mINP of ranking the gallery by distance to each query.

    Market-1501 protocol: for each query, gallery items of the same identity seen by the same
    camera are removed, and so are junk items (identity ``-1``); distractors (identity ``0``)
    stay as ordinary non-matches. A query with no remaining true match (or a junk query) is
    skipped: it counts in ``skipped_queries``, not in the averages. Rank-k is the share of
    valid queries whose first match is among the first k (k beyond the gallery = any match);
    AP averages precision at every match; INP = matches / rank of the last (hardest) match.
    Returns fractions in [0, 1] plus the two query counts; raises if no query is valid.
    """
    ranks = _check_ks(ranks, "ranks")
    queries, gallery = _matrix(query_feats, "query_feats"), _matrix(gallery_feats, "gallery_feats")
    if not len(queries) or not len(gallery):
        raise ValueError(f"reid_metrics needs queries and a gallery, got {len(queries)} and {len(gallery)}")
    qids, qcams = _vector(query_ids, len(queries), "query_ids"), _vector(query_cams, len(queries), "query_cams")
    gids, gcams = _vector(gallery_ids, len(gallery), "gallery_ids"), _vector(gallery_cams, len(gallery), "gallery_cams")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery features differ in size: {queries.shape[1]} vs {gallery.shape[1]}")
    scores = []
    for block in _chunks(len(queries), len(gallery)):
        order = np.argsort(_distances(queries[block], gallery, distance), axis=1, kind="stable")  # (q, G)
        for query, ranking in zip(range(block.start, block.stop), order):
            ids, cams = gids[ranking], gcams[ranking]
            keep = (ids != JUNK_IDENTITY) & ~((ids == qids[query]) & (cams == qcams[query]))
            matches = ids[keep] == qids[query]
            if qids[query] != JUNK_IDENTITY and matches.any():
                scores.append(_ranking_scores(matches))
    if not scores:
        raise ValueError(f"none of the {len(queries)} queries has a valid gallery match")
    first, ap, inp = (np.asarray(column) for column in zip(*scores))
    result = {f"rank{k}": float((first < k).mean()) for k in ranks}
    result.update(mAP=float(ap.mean()), mINP=float(inp.mean()))
    result.update(valid_queries=len(scores), skipped_queries=len(queries) - len(scores))
    return result


# --- face verification: LFW 10-fold protocol -----------------------------------------------------

def _best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold t maximising the accuracy of "same iff score > t" (the lowest on ties).

    Candidates are the midpoints between consecutive distinct scores, plus one below the
    lowest and one above the highest score, so every distinct split of the pairs is tried.
    """
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    positives, negatives = np.sort(scores[same]), np.sort(scores[~same])
    correct = len(positives) - np.searchsorted(positives, candidates, side="right")
    correct = correct + np.searchsorted(negatives, candidates, side="right")
    return float(candidates[int(np.argmax(correct))])


def _fold_labels(folds: int | Sequence[int], count: int) -> np.ndarray:
    """One fold label per pair: contiguous equal splits (sklearn KFold, no shuffle) or as given."""
    if isinstance(folds, (int, np.integer)):
        if not 2 <= folds <= count:
            raise ValueError(f"folds must be between 2 and the number of pairs ({count}), got {folds}")
        return np.concatenate([np.full(len(part), i) for i, part in enumerate(np.array_split(np.arange(count), folds))])
    labels = np.asarray(folds)
    if labels.shape != (count,) or len(np.unique(labels)) < 2:
        raise ValueError(f"fold labels must be one per pair ({count}) with at least 2 distinct folds")
    return labels


def verification_accuracy(scores: Any, same: Any, folds: int | Sequence[int] = 10) -> dict[str, float]:
    """Pair-verification accuracy by k-fold cross-validation of the decision threshold.

    ``scores`` are similarities (higher = more alike; pass negated distances otherwise) and
    ``same`` whether each pair shows one identity. ``folds`` is a count, splitting the pairs
    into contiguous folds in the order given (with LFW's ``pairs.txt`` order and 10 folds,
    exactly its ten 600-pair folds), or one fold label per pair. For each fold the threshold
    maximising accuracy on the other folds (see :func:`_best_threshold`) is applied to the
    held-out fold. Returns the mean held-out accuracy, its (population) standard deviation
    and the mean threshold.
    """
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same)
    if same.dtype != np.bool_ and same.size and np.isin(same, (0, 1)).all():
        same = same.astype(bool)  # 0/1 flags
    if scores.ndim != 1 or same.shape != scores.shape or same.dtype != np.bool_:
        raise ValueError(f"scores and same must be 1-D of equal length, same booleans; got {scores.shape}, "
                         f"{same.shape} of {same.dtype}")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    labels = _fold_labels(folds, len(scores))
    accuracies, thresholds = [], []
    for fold in np.unique(labels):
        held_out = labels == fold
        threshold = _best_threshold(scores[~held_out], same[~held_out])
        accuracies.append(float(((scores[held_out] > threshold) == same[held_out]).mean()))
        thresholds.append(threshold)
    return {"accuracy": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies)),
            "threshold": float(np.mean(thresholds))}


# --- product retrieval: SOP Recall@K -------------------------------------------------------------

def _label_codes(labels: Sequence[Hashable]) -> np.ndarray:
    """Any hashable labels as int codes (equal labels, equal codes)."""
    codes: dict[Hashable, int] = {}
    return np.asarray([codes.setdefault(label, len(codes)) for label in labels], dtype=np.int64)


def _first_match_ranks(distances: np.ndarray, same: np.ndarray) -> np.ndarray:
    """0-based rank of the first same-class item per row, ties broken by column order.

    A row without any same-class item gets the largest int64 (never within any k).
    """
    nearest = np.where(same, distances, np.inf).min(axis=1, keepdims=True)  # (q, 1)
    at_nearest = distances == nearest
    first = np.argmax(same & at_nearest, axis=1)[:, None]  # column of the first match at that distance
    columns = np.arange(distances.shape[1])[None, :]
    ranks = (distances < nearest).sum(axis=1) + (at_nearest & (columns < first)).sum(axis=1)
    return np.where(same.any(axis=1), ranks, np.iinfo(np.int64).max)


def recall_at_k(feats: Any, labels: Sequence[Hashable], ks: Sequence[int] = (1, 10, 100),
                distance: Distance = "cosine") -> dict[str, float]:
    """Share of items whose ``k`` nearest other items include one of the same class.

    SOP protocol: every item queries all the others (itself excluded; an exact duplicate is
    an ordinary neighbour). An item whose class has no other member cannot be retrieved and
    counts as a miss. ``k`` beyond the collection size means "any other item".
    """
    ks = _check_ks(ks, "ks")
    items = _matrix(feats, "feats")
    if len(labels) != len(items):
        raise ValueError(f"{len(items)} feature rows but {len(labels)} labels")
    if len(items) < 2:
        raise ValueError("recall_at_k needs at least 2 items")
    codes = _label_codes(labels)
    first = []
    for block in _chunks(len(items), len(items)):
        distances = _distances(items[block], items, distance)  # (q, N)
        same = codes[block, None] == codes[None, :]
        rows, selves = np.arange(len(distances)), np.arange(block.start, block.stop)
        distances[rows, selves], same[rows, selves] = np.inf, False
        first.append(_first_match_ranks(distances, same))
    first_match = np.concatenate(first)
    return {f"recall@{k}": float((first_match < k).mean()) for k in ks}


# --- registry adapters: metric(predictions, references) -----------------------------------------

def _embeddings(predictions: Sequence[Any]) -> np.ndarray:
    """Predictions as a (N, D) matrix; each is a vector or a mapping holding ``embedding``."""
    rows = [p["embedding"] if isinstance(p, Mapping) else p for p in predictions]
    return _matrix(rows, "predictions (embeddings)")


def _fields(references: Sequence[Any], key: str, count: int) -> list[Any]:
    """``reference[key]`` for each reference, or an error naming the first one lacking it."""
    if len(references) != count:
        raise ValueError(f"{count} predictions but {len(references)} references")
    for index, reference in enumerate(references):
        if not isinstance(reference, Mapping) or key not in reference:
            raise ValueError(f"reference {index} has no {key!r} field: {reference!r:.80}")
    return [reference[key] for reference in references]


def reid_metric(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]],
                distance: Distance = "cosine") -> dict[str, float]:
    """:func:`reid_metrics` over one list of embeddings; references carry ``identity``,
    ``camera`` and ``split`` (``query`` or ``gallery``) for each embedding."""
    feats = _embeddings(predictions)
    splits = np.asarray(_fields(references, "split", len(feats)))
    unknown = sorted(set(splits.tolist()) - {"query", "gallery"})
    if unknown:
        raise ValueError(f"reid references must have split 'query' or 'gallery', found {unknown}")
    ids = np.asarray(_fields(references, "identity", len(feats)))
    cams = np.asarray(_fields(references, "camera", len(feats)))
    query, gallery = splits == "query", splits == "gallery"
    return reid_metrics(feats[query], feats[gallery], ids[query], ids[gallery], cams[query], cams[gallery],
                        distance=distance)


def verification_metric(predictions: Sequence[Any], references: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """:func:`verification_accuracy` of the cosine similarity of each pair's two embeddings.

    References carry ``pair`` (pair index), ``side`` (0 or 1) and ``same`` (bool); pairs are
    taken in ``pair`` order, and their ``fold`` labels are used when every reference has one
    (else 10 contiguous folds).
    """
    feats = _normalise(_embeddings(predictions))
    pairs: dict[Any, dict[int, int]] = {}
    for index, (pair, side) in enumerate(zip(_fields(references, "pair", len(feats)),
                                             _fields(references, "side", len(feats)))):
        pairs.setdefault(pair, {})[side] = index
    incomplete = [pair for pair, sides in pairs.items() if set(sides) != {0, 1}]
    if incomplete:
        raise ValueError(f"verification needs sides 0 and 1 of every pair; incomplete pairs: {incomplete[:5]}")
    order = [pairs[pair] for pair in sorted(pairs)]
    scores = [float(feats[sides[0]] @ feats[sides[1]]) for sides in order]
    same_flags = _fields(references, "same", len(feats))
    same = np.asarray([bool(same_flags[sides[0]]) for sides in order])
    has_folds = all("fold" in r for r in references)
    folds = [references[sides[0]]["fold"] for sides in order] if has_folds else 10
    return verification_accuracy(scores, same, folds)


def recall_metric(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    """:func:`recall_at_k` (k = 1, 10, 100); references are labels or mappings with ``identity``."""
    feats = _embeddings(predictions)
    if any(isinstance(r, Mapping) for r in references):
        return recall_at_k(feats, _fields(references, "identity", len(feats)))
    return recall_at_k(feats, list(references))
