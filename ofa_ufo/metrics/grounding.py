"""Visual grounding over box sets: zero (the phrase names nothing), one or several boxes per example.

Boxes are ``[x0, y0, x1, y1]`` in pixels (the library's convention). As in OFA's evaluation, a
pair only counts when the intersection has positive width AND height, so boxes that merely touch
(or degenerate ones) never match.

Each prediction and each reference is a box set, written as one box ``[x0, y0, x1, y1]``, a list
of boxes, or ``[]`` / ``None`` for none.

``acc@0.5``
    An example is right when its predicted set P and its reference set R have the same size and
    P can be paired one-to-one with R so that every pair has IoU >= 0.5 (a perfect matching of
    the bipartite graph whose edges are the pairs at IoU >= 0.5). So an example with no object is
    right only when nothing is predicted; with one reference box it is right when exactly one box
    is predicted and it has IoU >= 0.5 (OFA's acc@0.5, which always predicts one box); with k
    reference boxes, exactly k boxes must be predicted, each on its own reference box. The value
    is the share of right examples.
``none_precision`` / ``none_recall`` / ``none_f1``
    "None" is the model saying there is no object (an empty predicted set). Precision: of the
    examples predicted empty, the share whose reference is empty; recall: of the examples whose
    reference is empty, the share predicted empty; F1 their harmonic mean. A ratio with nothing
    to count (no empty prediction, or no empty reference) is 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["box_iou", "box_sets_match", "grounding_accuracy", "grounding_scores"]

Box = Sequence[float]


def _check_box(box: Box, what: str) -> tuple[float, float, float, float]:
    """Turn a 4-number box into floats, with a clear error for anything else."""
    if len(box) != 4:
        raise ValueError(f"{what} must be [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0, y0, x1, y1


def box_iou(a: Box, b: Box) -> float:
    """IoU of two boxes; 0.0 unless the overlap has positive width and height."""
    ax0, ay0, ax1, ay1 = _check_box(a, "box")
    bx0, by0, bx1, by1 = _check_box(b, "box")
    inter_w = min(ax1, bx1) - max(ax0, bx0)
    inter_h = min(ay1, by1) - max(ay0, by0)
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union


def _box_set(value, what: str) -> list[list[float]]:
    """One box, a list of boxes, [] or None -> a list of boxes; anything else names `what` and the forms."""
    if value is None:
        return []
    try:
        boxes = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        boxes = None
    if boxes is not None and boxes.size == 0:
        return []
    if boxes is not None and boxes.shape == (4,):
        return [boxes.tolist()]
    if boxes is not None and boxes.ndim == 2 and boxes.shape[1] == 4:
        return boxes.tolist()
    raise ValueError(f"{what} must be a box [x0, y0, x1, y1], a list of such boxes, [] or None; got {value!r}")


def box_sets_match(predicted: Sequence[Box], reference: Sequence[Box], threshold: float = 0.5) -> bool:
    """Whether the two box lists pair up one-to-one at IoU >= `threshold` (see the module docstring);
    augmenting paths (Kuhn's algorithm) find the pairing when boxes overlap several candidates."""
    if len(predicted) != len(reference):
        return False
    edges = [[j for j, gold in enumerate(reference) if box_iou(box, gold) >= threshold] for box in predicted]
    owner: dict[int, int] = {}  # reference index -> predicted index it is paired with

    def claim(i: int, seen: set[int]) -> bool:
        for j in edges[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or claim(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(claim(i, set()) for i in range(len(predicted)))


def _ratio(hits: int, total: int) -> float:
    return hits / total if total else 0.0


def grounding_scores(predictions: Sequence, references: Sequence, threshold: float = 0.5) -> dict[str, float]:
    """``acc@<threshold>`` over box sets and the precision / recall / F1 of "none" (module docstring)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("grounding metrics need at least one sample")
    predicted = [_box_set(p, f"prediction {i}") for i, p in enumerate(predictions)]
    gold = [_box_set(r, f"reference {i}") for i, r in enumerate(references)]
    right = sum(box_sets_match(p, g, threshold) for p, g in zip(predicted, gold))
    said_none = sum(not p for p in predicted)
    is_none = sum(not g for g in gold)
    both = sum(not p and not g for p, g in zip(predicted, gold))
    precision, recall = _ratio(both, said_none), _ratio(both, is_none)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {f"acc@{threshold:g}": right / len(predicted), "none_precision": precision, "none_recall": recall,
            "none_f1": f1}


def grounding_accuracy(predictions: Sequence, references: Sequence, threshold: float = 0.5) -> dict[str, float]:
    """``acc@<threshold>`` alone (RefCOCO's figure): the share of examples whose box sets match."""
    key = f"acc@{threshold:g}"
    return {key: grounding_scores(predictions, references, threshold)[key]}
