"""The image processor of the extracted dense detector (`OFAUFOForObjectDetection`): OFA's resize and
normalisation (it is an `OFAUFOImageProcessor`) plus transformers' object-detection post-processing.

    processor = OFAUFODetectorImageProcessor(size=detector.config.image_size)
    outputs = detector(**processor(images))
    processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=[(h, w), ...])
    # [{"scores" (K,), "labels" (K,), "boxes" (K, 4) xyxy in target-size pixels}, ...]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ofa_ufo.hf.image_processing import OFAUFOImageProcessor
from ofa_ufo.models.damo_yolo import DenseDetector

__all__ = ["OFAUFODetectorImageProcessor"]

DEFAULT_NMS_IOU = 0.6
DEFAULT_MAX_DETECTIONS = 100


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in the range [0, 1], got {value!r}")
    return float(value)


def _target_sizes(target_sizes, batch: int) -> torch.Tensor | None:
    """(B, 2) float (height, width) per image, or None for boxes relative to the image ([0, 1])."""
    if target_sizes is None:
        return None
    sizes = torch.as_tensor(target_sizes if isinstance(target_sizes, torch.Tensor) else list(target_sizes),
                            dtype=torch.float32)
    if sizes.shape != (batch, 2):
        raise ValueError(f"target_sizes must hold one (height, width) per image: expected ({batch}, 2), got "
                         f"{tuple(sizes.shape)}")
    return sizes


class OFAUFODetectorImageProcessor(OFAUFOImageProcessor):
    """OFA's square resize + normalisation; `post_process_object_detection` turns the detector's dense
    output into per-image detections (score threshold, class-aware NMS, at most `max_detections`)."""

    def post_process_object_detection(self, outputs, threshold: float = 0.5,
                                      target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
                                      nms_iou: float = DEFAULT_NMS_IOU,
                                      max_detections: int = DEFAULT_MAX_DETECTIONS) -> list[dict[str, torch.Tensor]]:
        """Per image {"scores" (K,), "labels" (K,) class ids, "boxes" (K, 4) xyxy}, best score first.

        `outputs` has `logits` (B, A, C) and `pred_boxes` (B, A, 4) xyxy in [0, 1] (`OFAUFOForObjectDetection`).
        `target_sizes` ((B, 2) as (height, width), e.g. each original image's size) puts the boxes in those
        pixels; None keeps them relative. An image with nothing above `threshold` gets empty tensors."""
        threshold, nms_iou = _fraction("threshold", threshold), _fraction("nms_iou", nms_iou)
        if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
            raise ValueError(f"max_detections must be a positive integer, got {max_detections!r}")
        scores, boxes = outputs["logits"].float().sigmoid(), outputs["pred_boxes"].float()  # (B, A, C), (B, A, 4)
        sizes = _target_sizes(target_sizes, scores.shape[0])
        if sizes is not None:
            boxes = boxes * sizes.to(boxes.device)[:, None, [1, 0, 1, 0]]  # (w, h, w, h) per image
        return [DenseDetector.select_detections(boxes[b], scores[b], threshold, nms_iou, max_detections)
                for b in range(scores.shape[0])]
