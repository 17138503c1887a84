"""AlignedOTA label assignment (DAMO-YOLO): which anchors learn which ground-truth box.

Cost of giving anchor a to gt g = QFL-style classification cost against an IoU-valued soft target
(so classification and localisation quality are matched together) + 3 x (-log IoU) + a large penalty
unless the anchor lies inside g's box and its centre region. Each gt takes its k cheapest anchors,
k = clamp(int(sum of its top-`topk` IoUs), min 1) (SimOTA's dynamic k); an anchor claimed twice keeps
its cheapest gt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ofa_ufo.layers.detection_losses import box_iou, quality_focal_loss

IOU_COST_WEIGHT = 3.0
OUTSIDE_COST = 1e8


@dataclass
class Assignment:
    """Per anchor: `gt_index` (A,) long, -1 = negative; `quality` (A,) IoU of the match, 0 for negatives."""

    gt_index: torch.Tensor
    quality: torch.Tensor

    @property
    def positive(self) -> torch.Tensor:
        return self.gt_index >= 0


def _geometry(points: torch.Tensor, strides: torch.Tensor, gt_boxes: torch.Tensor,
              center_radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, N) masks: anchor inside the gt box; anchor within `center_radius` strides of the gt centre."""
    x, y = points[:, 0, None], points[:, 1, None]  # (A, 1)
    in_box = (x > gt_boxes[:, 0]) & (x < gt_boxes[:, 2]) & (y > gt_boxes[:, 1]) & (y < gt_boxes[:, 3])
    centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (N, 2)
    radius = center_radius * strides[:, None]  # (A, 1)
    in_centre = ((x - centre[:, 0]).abs() < radius) & ((y - centre[:, 1]).abs() < radius)
    return in_box, in_centre


def _cost(cls_logits: torch.Tensor, ious: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
    """(A, N) cost from class logits (A, C) and pairwise IoUs (A, N).

    The soft target is one-hot(gt class) x IoU, so its QFL summed over classes is the all-negative QFL
    plus a correction at the gt class only: no (A, N, C) tensor is built.
    """
    negative = quality_focal_loss(cls_logits, torch.zeros_like(cls_logits)).sum(-1)  # (A,)
    at_gt = cls_logits[:, gt_labels]  # (A, N)
    correction = quality_focal_loss(at_gt, ious) - quality_focal_loss(at_gt, torch.zeros_like(ious))
    return negative[:, None] + correction + IOU_COST_WEIGHT * -torch.log(ious + 1e-7)


def _dynamic_k_match(cost: torch.Tensor, ious: torch.Tensor, topk: int) -> torch.Tensor:
    """(A, N) bool: each gt's k cheapest anchors, k from its top-`topk` IoUs."""
    num_anchors = cost.shape[0]
    top_ious = ious.topk(min(topk, num_anchors), dim=0).values  # (k, N)
    dynamic_k = top_ious.sum(0).int().clamp(min=1, max=num_anchors)  # (N,)
    order = cost.argsort(dim=0)  # (A, N)
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(num_anchors, device=cost.device)[:, None].expand_as(order))
    return rank < dynamic_k[None]


def _check_inputs(cls_logits, pred_boxes, points, strides, gt_boxes, gt_labels) -> None:
    num_anchors = cls_logits.shape[0]
    expected = {"pred_boxes": (pred_boxes, (num_anchors, 4)), "points": (points, (num_anchors, 2)),
                "strides": (strides, (num_anchors,)), "gt_labels": (gt_labels, (gt_boxes.shape[0],))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be (N, 4) xyxy, got {tuple(gt_boxes.shape)}")
    if gt_labels.numel() and (gt_labels.min() < 0 or gt_labels.max() >= cls_logits.shape[1]):
        raise ValueError(f"gt_labels must lie in [0, {cls_logits.shape[1]}) (the head's classes)")


@torch.no_grad()
def aligned_ota_assign(cls_logits: torch.Tensor, pred_boxes: torch.Tensor, points: torch.Tensor,
                       strides: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                       center_radius: float = 2.5, topk: int = 10) -> Assignment:
    """Assign anchors (A,) of one image to its gts (N,): cls_logits (A, C), pred_boxes (A, 4) xyxy,
    points (A, 2), strides (A,), gt_boxes (N, 4) xyxy, gt_labels (N,). No gt: every anchor negative."""
    _check_inputs(cls_logits, pred_boxes, points, strides, gt_boxes, gt_labels)
    gt_index = torch.full((cls_logits.shape[0],), -1, dtype=torch.long, device=cls_logits.device)
    quality = torch.zeros(cls_logits.shape[0], dtype=pred_boxes.dtype, device=pred_boxes.device)
    if gt_boxes.shape[0] == 0:
        return Assignment(gt_index, quality)
    in_box, in_centre = _geometry(points, strides, gt_boxes, center_radius)
    candidates = (in_box | in_centre).any(1).nonzero()[:, 0]  # (Ac,)
    if candidates.numel() == 0:
        return Assignment(gt_index, quality)
    ious = box_iou(pred_boxes[candidates, None].float(), gt_boxes[None].float())  # (Ac, N)
    cost = _cost(cls_logits[candidates].float(), ious, gt_labels)
    cost = cost + OUTSIDE_COST * ~(in_box[candidates] & in_centre[candidates])
    matched = _dynamic_k_match(cost, ious, topk)
    best = cost.masked_fill(~matched, float("inf")).argmin(1)  # (Ac,) cheapest claiming gt
    positive = matched.any(1)
    gt_index[candidates[positive]] = best[positive]
    quality[candidates[positive]] = ious[positive, best[positive]].to(quality.dtype)
    return Assignment(gt_index, quality)
