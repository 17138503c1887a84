"""Pixel fidelity of generated images against reference images (image infilling, text-to-image).

OFA reports FID / IS / CLIP score for text-to-image; those need downloaded networks, so the
offline metric here is PSNR, which suits infilling (the reference is the original image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ofa_ufo.core.images import load_image


def psnr(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    """Mean PSNR in dB over (generated, reference) image pairs; each reference is resized (bicubic) to
    its prediction's size. Identical images count as 100 dB; a missing prediction as 0 dB."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    values = []
    for prediction, reference in zip(predictions, references):
        if prediction is None:
            values.append(0.0)
            continue
        prediction, reference = load_image(prediction), load_image(reference)
        reference = reference.resize(prediction.size, Image.BICUBIC)
        error = np.mean((np.asarray(prediction, np.float64) - np.asarray(reference, np.float64)) ** 2)
        values.append(100.0 if error == 0 else float(10 * np.log10(255.0**2 / error)))
    return {"psnr": float(np.mean(values)) if values else 0.0}

