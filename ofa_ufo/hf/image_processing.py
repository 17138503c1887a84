"""Image loading and OFA's image transform, with PIL + numpy + torch only (no torchvision).

OFA feeds the encoder a square, aspect-ratio-ignoring BICUBIC resize of the whole image,
scaled to [0, 1] and normalised with mean = std = 0.5 (so pixels lie in [-1, 1]). Boxes are
kept in original-image pixels elsewhere, so the processor can also return each original size.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import PILImageResampling

from ofa_ufo.core.images import ImageLike, load_image
from ofa_ufo.hf.saved_files import IMAGE_PROCESSOR_FILES, check_files, local_directory, naming_files

__all__ = ["OFAUFOImageProcessor"]

OFA_MEAN = (0.5, 0.5, 0.5)
OFA_STD = (0.5, 0.5, 0.5)


class OFAUFOImageProcessor(BaseImageProcessor):
    """OFA's image transform: square BICUBIC resize to ``size``, [0, 1], normalise by mean/std.

    Returns ``pixel_values`` (B, 3, size, size) float32, and with ``return_original_sizes=True``
    also ``original_sizes`` (B, 2) int64 as (width, height), which the box codec needs to map bins
    back to original pixels (see ``OFAUFOProcessor.__call__`` for why it is not returned by default).
    """

    model_input_names = ["pixel_values"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> OFAUFOImageProcessor:
        """As transformers', but a truncated, non-JSON or wrong-type processor_config.json (or
        preprocessor_config.json), or a setting of the wrong value, fails with an error naming the file."""
        directory = local_directory(pretrained_model_name_or_path, kwargs.get("subfolder"))
        check_files(directory, IMAGE_PROCESSOR_FILES)
        with naming_files(directory, IMAGE_PROCESSOR_FILES, "the image processor"):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __init__(
        self,
        size: int = 384,
        resample: int = PILImageResampling.BICUBIC,
        image_mean: Sequence[float] = OFA_MEAN,
        image_std: Sequence[float] = OFA_STD,
        **kwargs,
    ) -> None:
        kwargs.pop("image_processor_type", None)  # written by to_dict, not a setting
        super().__init__(**kwargs)
        if isinstance(size, bool) or not isinstance(size, numbers.Real) or int(size) != size or size < 1:
            raise ValueError(f"size must be a positive number of pixels (an integer), got {size!r}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got {image_mean} and {image_std}")
        self.size = int(size)
        self.resample = int(resample)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)

    def _transform(self, image: Image.Image) -> np.ndarray:
        """(3, size, size) float32 normalised pixels of one RGB image."""
        resized = image.resize((self.size, self.size), resample=self.resample)
        pixels = np.asarray(resized, dtype=np.float32) / 255.0  # (S, S, 3)
        pixels = (pixels - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return pixels.transpose(2, 0, 1)  # (3, S, S)

    def preprocess(
        self,
        images: ImageLike | Sequence[ImageLike],
        return_tensors: str | None = "pt",
        return_original_sizes: bool = False,
    ) -> BatchFeature:
        """Load and transform one image or a list of images (paths, URLs, PIL images, uint8 arrays)."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        loaded = [load_image(image) for image in batch]
        data = {"pixel_values": np.stack([self._transform(image) for image in loaded])}  # (B, 3, S, S)
        if return_original_sizes:
            data["original_sizes"] = np.array([image.size for image in loaded], dtype=np.int64)  # (B, 2) as (w, h)
        return BatchFeature(data=data, tensor_type=return_tensors)
