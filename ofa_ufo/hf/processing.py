"""One processor for prompts, targets and images, in OFA's layout.

Encoder source = ``<s>`` + BPE(prompt) + ``</s>``; target (``labels``) = BPE(target) + ``</s>``.
Samples may lack an image (text-only tasks such as text-to-image): their ``pixel_values`` are
zeros and ``image_mask`` is False, so one batch can mix both kinds.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from ofa_ufo.core.box_codec import BoxCodec, BoxMode
from ofa_ufo.core.images import ImageLike
from ofa_ufo.hf.image_processing import OFAUFOImageProcessor
from ofa_ufo.hf.saved_files import (
    CONFIG_FILES, IMAGE_PROCESSOR_FILES, check_files, local_directory, naming_files, tokenizer_files,
)
from ofa_ufo.hf.tokenization import OFAUFOTokenizer

__all__ = ["OFAUFOProcessor"]

IGNORE_INDEX = -100


class OFAUFOProcessor(ProcessorMixin):
    """Tokenizer + image processor + box convention, saved together with ``save_pretrained``.

    ``box_mode`` ("normalized" or "ofa", for converted OFA checkpoints) and ``max_image_size``
    are stored in ``processor_config.json`` and exposed as :attr:`box_codec`.
    The sub-processors are loaded through the Auto classes, which ``import ofa_ufo`` registers.
    """

    def __init__(
        self,
        image_processor: OFAUFOImageProcessor,
        tokenizer: OFAUFOTokenizer,
        box_mode: BoxMode = "normalized",
        max_image_size: int = 512,
        **kwargs,
    ) -> None:
        if not isinstance(tokenizer, OFAUFOTokenizer):
            raise TypeError(
                f"OFAUFOProcessor needs an OFAUFOTokenizer, got {type(tokenizer).__name__} "
                "(AutoTokenizer falls back to a generic class when `ofa_ufo` was not imported)"
            )
        if not isinstance(image_processor, OFAUFOImageProcessor):
            raise TypeError(f"OFAUFOProcessor needs an OFAUFOImageProcessor, got {type(image_processor).__name__}")
        self.box_mode = box_mode
        self.max_image_size = max_image_size
        super().__init__(image_processor, tokenizer, **kwargs)
        BoxCodec(mode=box_mode, max_image_size=max_image_size)  # fail now on a bad box_mode, not at first use

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> OFAUFOProcessor:
        """As transformers', but every file it reads is checked first (processor_config.json, the tokenizer
        files, and config.json, which AutoTokenizer reads to pick the class), so a truncated, non-JSON or
        wrong-type one fails with an error naming the file; so does a processor setting of the wrong value."""
        directory = local_directory(pretrained_model_name_or_path, kwargs.get("subfolder"))
        check_files(directory, IMAGE_PROCESSOR_FILES + tokenizer_files(directory) + CONFIG_FILES)
        with naming_files(directory, IMAGE_PROCESSOR_FILES, "the processor"):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def box_codec(self) -> BoxCodec:
        """The codec between original-image pixel boxes and this tokenizer's bins."""
        return BoxCodec(num_bins=self.tokenizer.num_bins, mode=self.box_mode, max_image_size=self.max_image_size)

    @property
    def model_input_names(self) -> list[str]:
        """What the model's forward takes, and all ``__call__`` returns unless asked for ``original_sizes``."""
        return ["input_ids", "attention_mask", "pixel_values", "image_mask"]

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike | None] | None = None,
        text: str | Sequence[str] | None = None,
        text_target: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        max_length: int | None = None,
        return_original_sizes: bool = False,
    ) -> BatchFeature:
        """Batch prompts (``input_ids``, ``attention_mask``), images and optional targets.

        ``images`` is one image or a list with one entry per prompt, ``None`` entries (or
        ``images=None``) marking samples without an image. Always returned: ``pixel_values``
        (B, 3, S, S) and ``image_mask`` (B,) bool. ``labels`` are added for ``text_target``
        (padded with -100).

        Only what the model takes is returned by default, as transformers processors do, so
        ``model(**inputs)`` and ``model.generate(**inputs)`` work as is (generate rejects keys the
        model does not take). ``return_original_sizes=True`` adds ``original_sizes`` (B, 2) as
        (width, height), (0, 0) without an image: box post-processing needs them, the model never
        does, so it does not take them as an ignored argument either.

        Sequences are right-padded with ``<pad>``. A prompt or target longer than ``max_length``
        tokens (default: ``tokenizer.model_max_length``) is truncated, keeping its final
        ``</s>``, and a ``UserWarning`` names the sample and how many tokens were dropped.
        """
        if text is None and images is None:
            raise ValueError("give at least one of `images` and `text`")
        prompts = [text] if isinstance(text, str) else None if text is None else list(text)
        image_list = self._image_list(images, len(prompts) if prompts is not None else None)
        if not image_list:
            raise ValueError("empty batch: no prompts and no images")
        limit = max_length if max_length is not None else self.tokenizer.model_max_length

        data = self._images(image_list, return_original_sizes)
        if prompts is not None:
            rows = self._token_rows(prompts, "prompt", limit)
            data["input_ids"] = self._pad(rows, self.tokenizer.pad_token_id)
            data["attention_mask"] = self._pad([[1] * len(ids) for ids in rows], 0)
        if text_target is not None:
            targets = [text_target] if isinstance(text_target, str) else list(text_target)
            if len(targets) != len(image_list):
                raise ValueError(f"got {len(targets)} targets for {len(image_list)} samples")
            data["labels"] = self._pad(self._token_rows(targets, "target", limit), IGNORE_INDEX)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _image_list(images: object, batch_size: int | None) -> list:
        """One entry (image or None) per sample; the counts must agree with the prompts."""
        if images is None:
            return [None] * batch_size
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        if batch_size is not None and len(image_list) != batch_size:
            raise ValueError(
                f"got {len(image_list)} images for {batch_size} prompts; give one image (or None) per prompt"
            )
        return image_list

    def _images(self, image_list: list, return_original_sizes: bool) -> dict[str, np.ndarray]:
        """Pixel values, image mask and (if asked) original sizes, with zeros where a sample has no image."""
        size = self.image_processor.size
        present = [i for i, image in enumerate(image_list) if image is not None]
        pixel_values = np.zeros((len(image_list), 3, size, size), dtype=np.float32)  # (B, 3, S, S)
        original_sizes = np.zeros((len(image_list), 2), dtype=np.int64)  # (B, 2) as (w, h)
        if present:
            processed = self.image_processor([image_list[i] for i in present], return_tensors="np",
                                             return_original_sizes=True)
            pixel_values[present] = processed["pixel_values"]
            original_sizes[present] = processed["original_sizes"]
        image_mask = np.zeros(len(image_list), dtype=bool)
        image_mask[present] = True
        data = {"pixel_values": pixel_values, "image_mask": image_mask}
        return {**data, "original_sizes": original_sizes} if return_original_sizes else data

    def _token_rows(self, texts: list[str], kind: str, limit: int) -> list[list[int]]:
        """Token ids per text: ``<s> text </s>`` for prompts, ``text </s>`` for targets.

        Rows over ``limit`` are cut to ``limit`` keeping the final ``</s>``, with a warning.
        """
        if limit < 2:
            raise ValueError(f"max_length must be at least 2 to keep a token and </s>, got {limit}")
        if kind == "prompt":
            rows = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        else:
            eos = self.tokenizer.eos_token_id
            rows = [ids + [eos] for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for i, ids in enumerate(rows):
            if len(ids) > limit:
                warnings.warn(
                    f"{kind} {i} has {len(ids)} tokens, more than max_length={limit}: "
                    f"truncated by {len(ids) - limit} tokens (the final </s> is kept)",
                    UserWarning,
                    stacklevel=3,
                )
                rows[i] = ids[: limit - 1] + ids[-1:]
        return rows

    @staticmethod
    def _pad(rows: list[list[int]], value: int) -> np.ndarray:
        """Right-pad rows to the longest one: (B, L) int64."""
        out = np.full((len(rows), max(len(r) for r in rows)), value, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out
