"""Class-aware non-maximum suppression in plain torch (torchvision is not a dependency)."""

from __future__ import annotations

import torch

from ofa_ufo.layers.detection_losses import box_iou


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Indices (M,) of the boxes kept, highest score first; a box is suppressed by a higher-scored box of
    the same label whose IoU with it exceeds `iou_threshold`. boxes (K, 4) xyxy, scores (K,), labels (K,)."""
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1] or labels.shape != scores.shape:
        raise ValueError(f"expected boxes (K, 4), scores (K,), labels (K,); got {tuple(boxes.shape)}, "
                         f"{tuple(scores.shape)}, {tuple(labels.shape)}")
    order = scores.argsort(descending=True)
    boxes, labels = boxes[order], labels[order]
    overlaps = box_iou(boxes[:, None], boxes[None]) > iou_threshold  # (K, K)
    suppresses = torch.triu(overlaps & (labels[:, None] == labels[None]), diagonal=1)  # row i outranks column j
    # Greedy NMS is the fixed point of "keep j unless a kept, higher-scored box suppresses it"; iterating from
    # all-kept settles one more rank per pass at least, and in a few passes on real detections.
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    while True:
        settled = ~(suppresses & keep[:, None]).any(0)
        if torch.equal(settled, keep):
            return order[keep]
        keep = settled
