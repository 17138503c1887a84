"""The one place where boxes in original-image pixels become location bins and back.

Public APIs speak ``x0 y0 x1 y1`` (top-left, bottom-right) in pixels of the ORIGINAL image;
the model speaks ``<bin_k>`` tokens. Two modes:

``"normalized"`` (default, for models trained by this library)
    ``bin = round(x / W * (num_bins - 1))`` (``y / H`` for y), so the bins always span the
    whole image whatever the model input size. Decode: ``bin / (num_bins - 1) * W``.
``"ofa"`` (converted OFA checkpoints)
    OFA scales the box to the model input first, then divides by ``max_image_size`` (512):
    ``bin = round(x * input_w / W / max_image_size * (num_bins - 1))``. Decode:
    ``bin / (num_bins - 1) * max_image_size * W / input_w``. An input larger than
    ``max_image_size`` cannot be represented beyond it: such coordinates clip to the last bin.

Rounding is half-to-even (``numpy.rint``), as OFA's ``torch.round``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["BoxCodec", "BoxMode"]

BoxMode = Literal["normalized", "ofa"]


def _as_boxes(values: ArrayLike, what: str) -> np.ndarray:
    """View a single box (4,) or a batch (N, 4) as an (N, 4) array."""
    arr = np.asarray(values)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what} must have shape (4,) or (N, 4), got shape {arr.shape}")
    return arr


def _as_size(size: Sequence[float], name: str) -> tuple[float, float]:
    """Check a (width, height) pair is two finite positive numbers."""
    try:
        w, h = (float(v) for v in size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a (width, height) pair, got {size!r}") from err
    if not (np.isfinite(w) and np.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"{name} must be positive, got (width, height) = {size!r}")
    return w, h


@dataclass(frozen=True)
class BoxCodec:
    """Converts boxes between original-image pixels and bin indices (see the module docstring)."""

    num_bins: int = 1000
    mode: BoxMode = "normalized"
    max_image_size: int = 512

    def __post_init__(self) -> None:
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {self.num_bins}")
        if self.mode not in ("normalized", "ofa"):
            raise ValueError(f"mode must be 'normalized' or 'ofa', got {self.mode!r}")
        if self.max_image_size <= 0:
            raise ValueError(f"max_image_size must be positive, got {self.max_image_size}")

    def _span(
        self, image_size: Sequence[float], input_size: Sequence[float] | None
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """Original-pixel length covered by the full bin range, per coordinate (x0, y0, x1, y1)."""
        w, h = _as_size(image_size, "image_size")
        if self.mode == "normalized":
            span_w, span_h = w, h
        else:
            if input_size is None:
                raise ValueError("BoxCodec(mode='ofa') needs input_size, the (width, height) fed to the model")
            in_w, in_h = _as_size(input_size, "input_size")
            span_w, span_h = self.max_image_size * w / in_w, self.max_image_size * h / in_h
        return np.array([span_w, span_h, span_w, span_h]), (w, h)

    def _check_bins(self, bins: ArrayLike) -> np.ndarray:
        """(N, 4) int64 bins, each in [0, num_bins - 1]."""
        arr = _as_boxes(bins, "bins")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"bins must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        bad = (arr < 0) | (arr >= self.num_bins)
        if bad.any():
            raise ValueError(f"bin {int(arr[bad][0])} out of range [0, {self.num_bins - 1}]")
        return arr

    def encode(
        self,
        boxes: ArrayLike,
        image_size: Sequence[float],
        input_size: Sequence[float] | None = None,
    ) -> np.ndarray:
        """Quantise pixel boxes to bins: ``(N, 4)`` int64, also for a single ``(4,)`` box.

        ``image_size`` is the original (width, height); ``input_size`` the model input
        (width, height), needed in ``"ofa"`` mode only. A box must lie inside the image
        (up to a relative tolerance of 1e-6) with x0 <= x1 and y0 <= y1.
        """
        arr = _as_boxes(boxes, "boxes").astype(np.float64)
        span, (w, h) = self._span(image_size, input_size)
        limit = np.array([w, h, w, h])
        tol = 1e-6 * limit
        for box in arr:
            problem = None
            if not np.all(np.isfinite(box)):
                problem = "has a non-finite coordinate"
            elif box[2] < box[0] or box[3] < box[1]:
                problem = "has negative width or height (need x0 <= x1 and y0 <= y1)"
            elif np.any(box < -tol) or np.any(box > limit + tol):
                problem = "lies outside the image"
            if problem:
                raise ValueError(f"box {box.tolist()} {problem}; image (width, height) = ({w:g}, {h:g})")
        scaled = np.clip(arr, 0.0, limit) / span * (self.num_bins - 1)
        return np.clip(np.rint(scaled), 0, self.num_bins - 1).astype(np.int64)

    def decode(
        self,
        bins: ArrayLike,
        image_size: Sequence[float],
        input_size: Sequence[float] | None = None,
    ) -> np.ndarray:
        """Map bins back to pixel boxes: ``(N, 4)`` float64 inside the image, x0 <= x1, y0 <= y1.

        Reversed corners (a model may emit them) are swapped rather than rejected.
        """
        arr = self._check_bins(bins)
        span, (w, h) = self._span(image_size, input_size)
        coords = np.clip(arr / (self.num_bins - 1) * span, 0.0, np.array([w, h, w, h]))
        xs, ys = np.sort(coords[:, 0::2], axis=1), np.sort(coords[:, 1::2], axis=1)
        return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)

    def to_text(self, bins: ArrayLike) -> str | list[str]:
        """OFA's target text ``"<bin_a> <bin_b> <bin_c> <bin_d>"``: a string for one box, a list for (N, 4)."""
        texts = [" ".join(f"<bin_{k}>" for k in box) for box in self._check_bins(bins).tolist()]
        return texts[0] if np.ndim(bins) == 1 else texts

    def from_token_ids(self, ids: ArrayLike, bin_offset: int) -> np.ndarray:
        """Bin indices of bin-token ids (any shape kept); a non-bin id raises ValueError naming it."""
        arr = np.asarray(ids, dtype=np.int64)
        bins = arr - bin_offset
        bad = (bins < 0) | (bins >= self.num_bins)
        if bad.any():
            raise ValueError(
                f"token id {int(arr[bad].flat[0])} is not a bin token "
                f"(bin ids are {bin_offset}..{bin_offset + self.num_bins - 1})"
            )
        return bins
