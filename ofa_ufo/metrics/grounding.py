"""Visual grounding accuracy: a prediction is right when its IoU with the gold box is >= 0.5.

Boxes are ``[x0, y0, x1, y1]`` in pixels (the library's convention). As in OFA's evaluation, a
pair only counts when the intersection has positive width AND height, so boxes that merely touch
(or degenerate ones) never match. A missing prediction (``[]`` or ``None``) counts as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["box_iou", "grounding_accuracy"]

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


def _found(prediction: Box | None) -> bool:
    """Whether the model produced a box at all (``None`` and empty mean it did not)."""
    return prediction is not None and len(prediction) > 0


def grounding_accuracy(
    predictions: Sequence[Box | None], references: Sequence[Box], threshold: float = 0.5
) -> dict[str, float]:
    """Share of predicted boxes with IoU >= ``threshold`` against the gold box (``acc@0.5``)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("grounding_accuracy needs at least one sample")
    hits = sum(_found(pred) and box_iou(pred, gold) >= threshold for pred, gold in zip(predictions, references))
    return {f"acc@{threshold:g}": hits / len(predictions)}
