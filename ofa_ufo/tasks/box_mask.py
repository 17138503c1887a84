"""Grounding's auxiliary box-mask loss: which image tokens a referring expression names.

OFA ties an expression to its object through millions of pretraining pairs. A small model trained
from scratch on the demo scenes learns to box a lone object but, with several in the scene, picks
one at chance: the loss on four location bins says nothing about *which* image tokens the words
refer to (benchmarks/README.md). This loss says it directly: on grounding rows a linear head over
the encoder's image tokens predicts the share of each token's grid cell that the referred box(es)
cover (binary cross-entropy), so the named object's tokens must take in the text and stand out,
and the decoder can find them. The head is training-only (`GroundingTask.auxiliary_head`); the
exported model is unchanged. `cell_coverage` is also the stem warm-up's rule for which cells an
object labels (`ofa_ufo.training.stem_warmup`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

STRIDE = 16  # the ResNet stem's output stride: one image token per 16 x 16 input pixels


def _overlap(lo: float, hi: float, cells: int) -> np.ndarray:
    """(cells,) share of each of `cells` equal intervals of [0, 1] that [lo, hi] covers."""
    edges = np.linspace(0.0, 1.0, cells + 1)
    return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None) * cells


def cell_coverage(boxes: Sequence[Sequence[float]], image_size: tuple[int, int], rows: int, cols: int) -> np.ndarray:
    """(rows, cols) share of each grid cell inside any of `boxes` (x0, y0, x1, y1 in pixels of an
    image of `image_size` = (width, height)); row-major like the image tokens. The encoder sees the
    image resized to a square, so the cells split each axis of the original evenly."""
    width, height = image_size
    cover = np.zeros((rows, cols))
    for x0, y0, x1, y1 in boxes:
        across = _overlap(x0 / width, x1 / width, cols)  # (cols,)
        down = _overlap(y0 / height, y1 / height, rows)  # (rows,)
        cover = np.maximum(cover, down[:, None] * across[None, :])  # (rows, cols)
    return cover


def referred_boxes(example: dict[str, Any]) -> list[Sequence[float]]:
    """The box(es) a grounding example's expression denotes: `box`, or `boxes` (possibly none)."""
    if example.get("box") is not None:
        return [example["box"]]
    return list(example.get("boxes") or [])


def box_mask_loss(head: torch.nn.Module, encoder_states: torch.Tensor, pixel_values: torch.Tensor | None,
                  examples: Sequence[dict[str, Any]], rows: Sequence[int]) -> torch.Tensor:
    """Binary cross-entropy summed over the image tokens of batch rows `rows` (0 without any).

    encoder_states (B, L, D) hold the image tokens first (OFA's encoder order); `examples` (the
    whole batch's) carry `image_size` (width, height) of their original image, as the trainer's
    batches give them."""
    if pixel_values is None or not rows:
        return encoder_states.new_zeros((), dtype=torch.float32)
    grid_rows, grid_cols = (math.ceil(side / STRIDE) for side in pixel_values.shape[-2:])
    targets = np.stack([cell_coverage(referred_boxes(examples[i]), examples[i]["image_size"], grid_rows, grid_cols)
                        for i in rows]).reshape(len(rows), -1)  # (R, rows, cols) -> (R, N)
    targets = torch.from_numpy(targets).float().to(encoder_states.device)
    logits = head(encoder_states[rows, : grid_rows * grid_cols]).squeeze(-1).float()  # (R, N, 1) -> (R, N)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
