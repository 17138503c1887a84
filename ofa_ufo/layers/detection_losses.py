"""Box overlap and the dense detector's losses (GFL: quality focal + distribution focal; GIoU).

Boxes are xyxy tensors. The overlap functions broadcast over leading dimensions, so one function serves
both uses: elementwise `box_iou(a, b)` with a, b (N, 4) -> (N,), and pairwise
`box_iou(a[:, None], b[None])` -> (N, M). Losses are returned per element (no reduction): the caller
weights and normalises them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_boxes(*boxes: torch.Tensor) -> None:
    for b in boxes:
        if b.shape[-1] != 4:
            raise ValueError(f"boxes must be (..., 4) xyxy tensors, got shape {tuple(b.shape)}")


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _iou_and_union(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_boxes(a, b)
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = _area(a) + _area(b) - inter
    return inter / (union + eps), union


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of xyxy boxes, broadcast over leading dims: (..., 4), (..., 4) -> (...)."""
    return _iou_and_union(a, b, eps)[0]


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU = IoU - (enclosing area - union) / enclosing area; broadcast like `box_iou`, in [-1, 1]."""
    iou, union = _iou_and_union(a, b, eps)
    enclosing = _area(torch.cat([torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], -1))
    return iou - (enclosing - union) / (enclosing + eps)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - GIoU per box pair: (N, 4), (N, 4) -> (N,)."""
    return 1.0 - generalized_box_iou(pred, target)


def quality_focal_loss(logits: torch.Tensor, targets_quality: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """QFL (GFL, Li et al. 2020): BCE(sigmoid(logits), q) x |sigmoid(logits) - q|^beta, elementwise.

    `targets_quality` has the logits' shape: the IoU of the matched box at the gt class of a positive,
    0 everywhere else, so the class score learns to predict localisation quality.
    """
    if logits.shape != targets_quality.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets_quality {tuple(targets_quality.shape)} differ")
    modulator = (logits.sigmoid() - targets_quality).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, targets_quality, reduction="none") * modulator


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL: cross-entropy to the two bins around a continuous target, weighted by linear interpolation.

    logits (N, reg_max + 1) over bins 0..reg_max; target (N,) float in [0, reg_max] -> (N,).
    """
    reg_max = logits.shape[-1] - 1
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, reg_max + 1) and target (N,), got {tuple(logits.shape)}, "
                         f"{tuple(target.shape)}")
    if target.numel() and (target.min() < 0 or target.max() > reg_max):
        raise ValueError(f"distribution_focal_loss targets must lie in [0, {reg_max}]")
    left = target.floor().long().clamp(max=reg_max - 1)
    right = left + 1
    weight_left = right.to(target.dtype) - target
    log_probs = logits.log_softmax(-1)
    nll_left = -log_probs.gather(-1, left[:, None])[:, 0]
    nll_right = -log_probs.gather(-1, right[:, None])[:, 0]
    return nll_left * weight_left + nll_right * (1.0 - weight_left)
