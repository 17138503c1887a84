"""COCO box mAP through pycocotools, from plain per-image dicts.

Predictions are ``{"boxes": [[x0, y0, x1, y1], ...], "labels": [...], "scores": [...]}`` per image
and ground truth ``{"boxes": [...], "labels": [...]}``, in pixels. Labels may be any hashable
(class names or ids); they are mapped to COCO category ids internally. Both sides are turned into
in-memory COCO datasets (boxes to ``[x, y, w, h]``, area ``w * h``, no crowd regions) and scored by
``COCOeval`` with ``iouType="bbox"``; its console output is swallowed. Images without predictions
simply contribute false negatives; labels only ever predicted have no ground truth and, as in COCO,
are left out of the class average. The result holds ``map`` (mAP@[.5:.95], COCO's headline number)
and ``map50`` (mAP@0.5), both over all areas with at most 100 detections per image.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["coco_map"]


Sample = Mapping[str, Sequence[Any]]


def _annotation(box: Sequence[float], category_id: int, image_id: int) -> dict[str, Any]:
    """One COCO annotation (without id): ``[x0, y0, x1, y1]`` becomes ``[x, y, w, h]``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = x1 - x0, y1 - y0
    return {
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x0, y0, width, height],
        "area": width * height,
        "iscrowd": 0,
    }


def _annotations(
    sample: Sample, image_id: int, categories: Mapping[Hashable, int], with_scores: bool
) -> list[dict[str, Any]]:
    """COCO annotation dicts (without ids) for one image's boxes, scored on the prediction side."""
    boxes, labels = sample.get("boxes", []), sample.get("labels", [])
    scores = sample.get("scores", []) if with_scores else [None] * len(boxes)
    if not len(boxes) == len(labels) == len(scores):
        fields = "boxes, labels and scores" if with_scores else "boxes and labels"
        raise ValueError(f"image {image_id}: {fields} differ in length")
    anns = [_annotation(box, categories[label], image_id) for box, label in zip(boxes, labels)]
    if with_scores:
        for ann, score in zip(anns, scores):
            ann["score"] = float(score)
    return anns


def _coco(samples: Sequence[Sample], categories: Mapping[Hashable, int], with_scores: bool) -> COCO:
    """An in-memory COCO object holding every image (even empty ones) and category."""
    anns = [
        ann
        for image_id, sample in enumerate(samples)
        for ann in _annotations(sample, image_id, categories, with_scores)
    ]
    for ann_id, ann in enumerate(anns, start=1):  # COCOeval treats id 0 as "unmatched"
        ann["id"] = ann_id
    coco = COCO()
    coco.dataset = {
        "images": [{"id": image_id} for image_id in range(len(samples))],
        "categories": [{"id": cat_id, "name": str(label)} for label, cat_id in categories.items()],
        "annotations": anns,
    }
    coco.createIndex()
    return coco


def _category_ids(*sides: Sequence[Sample]) -> dict[Hashable, int]:
    """Number every label seen on either side, in first-seen order, from 1."""
    labels = dict.fromkeys(label for side in sides for sample in side for label in sample.get("labels", []))
    return {label: cat_id for cat_id, label in enumerate(labels, start=1)}


def coco_map(predictions: Sequence[Sample], references: Sequence[Sample]) -> dict[str, float]:
    """COCO bbox mAP@[.5:.95] (``map``) and mAP@0.5 (``map50``) of per-image detections."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not any(len(ref.get("boxes", [])) for ref in references):
        raise ValueError("coco_map needs at least one ground-truth box")
    categories = _category_ids(references, predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = _coco(references, categories, False), _coco(predictions, categories, True)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": float(evaluator.stats[0]), "map50": float(evaluator.stats[1])}
