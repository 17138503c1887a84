"""Image generation as VQGAN code sequences (OFA, reference/ofa.md 4.2): text-to-image and image infilling.

`text_to_image`: the encoder reads only the prompt; the decoder samples a side x side grid of code
tokens (side = image_size / f, 32x32 = 1,024 for OFA's f=8 VQGAN at 256 px), then </s>.
`image_infill`: the encoder sees the image with the central half blanked (OFA: pixels zeroed after
normalisation); the decoder samples the (side/2)^2 codes of the centre, which are pasted into the
VQGAN codes of the whole image before decoding.

Both need a `VQGANModel` to turn codes into pixels (and images into training targets): the
`vqgan` option (a model or a `save_pretrained` directory), else `<model dir>/vqgan`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, PreTrainedModel

from ofa_ufo.core.images import load_image
from ofa_ufo.core.prompts import DEFAULT_STYLE, format_prompt
from ofa_ufo.generation.codes import generate_codes, tokens_to_codes
from ofa_ufo.tasks.base import Task

if TYPE_CHECKING:  # tasks/ sits below hf/: the VQGAN is loaded through the Auto class registered there
    from ofa_ufo.hf.modeling_vqgan import VQGANModel

__all__ = ["CaptionDropout", "CodeSamples", "ImageInfillTask", "TextToImageTask", "VQGAN_SUBDIR", "resolve_vqgan"]

VQGAN_SUBDIR = "vqgan"  # a VQGAN saved next to the model: <model dir>/vqgan (VQGANModel.save_pretrained)
VQGAN_MODEL_TYPE = "ofa-ufo-vqgan"  # VQGANConfig.model_type
_OFA_DECODING = dict(do_sample=True, top_k=256, num_beams=1)  # OFA's T2I sampling (reference 4.2, 9)


def resolve_vqgan(source: VQGANModel | str | os.PathLike | None, model=None) -> VQGANModel:
    """The VQGAN to use: `source` (a model, or a directory saved with `VQGANModel.save_pretrained`),
    else `<model dir>/vqgan` next to a model loaded from a directory; in eval mode on the model's device."""
    if source is None and model is not None:
        beside = Path(str(getattr(model, "name_or_path", "") or "")) / VQGAN_SUBDIR
        source = beside if (beside / "config.json").is_file() else None
    if source is None:
        raise ValueError(
            "image generation needs a VQGAN to turn codes into pixels: pass vqgan=<a VQGANModel or a directory "
            "saved with VQGANModel.save_pretrained>, or save one as <model dir>/vqgan (see docs/vqgan.md)"
        )
    vqgan = source if isinstance(source, PreTrainedModel) else _load_vqgan(str(Path(source).resolve()))
    if getattr(vqgan.config, "model_type", None) != VQGAN_MODEL_TYPE:
        raise ValueError(f"vqgan={source!r} is a {type(vqgan).__name__}, not a VQGANModel")
    if model is not None:
        if vqgan.config.n_embed > model.config.num_codes:
            raise ValueError(f"the VQGAN has {vqgan.config.n_embed} codes but the model's vocabulary only "
                             f"{model.config.num_codes} <code_k> tokens")
        vqgan.to(model.device)
    return vqgan.eval()


@lru_cache(maxsize=4)
def _load_vqgan(path: str) -> VQGANModel:
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"vqgan={path!r} is not a VQGANModel.save_pretrained directory (no config.json)")
    return AutoModel.from_pretrained(path)


def image_to_pixels(image: Image.Image, size: int, vqgan: VQGANModel) -> torch.Tensor:
    """OFA's code extraction input: square LANCZOS resize to `size`, RGB in [-1, 1], (1, 3, size, size)."""
    vqgan.code_grid(size, size)  # a size that is not a multiple of the downsampling factor fails here
    array = np.asarray(image.convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(vqgan.device)  # (1, 3, S, S)


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def code_text(codes: torch.Tensor) -> str:
    """Code indices -> the target string `<code_i><code_j>...` (row-major)."""
    return "".join(f"<code_{int(c)}>" for c in codes.flatten())


@dataclass
class CodeSamples:
    """One input's generated samples: code token ids (k, side*side), their log-probabilities (k,), and
    the VQGAN and grid side that decode them."""

    tokens: torch.Tensor
    logprobs: list[float]
    vqgan: VQGANModel
    side: int


@dataclass
class ImageGenTask(Task):
    """Shared by the image-generation tasks: decoding, VQGAN handling, the result.

    Options: `vqgan` (see `resolve_vqgan`), `image_size` (pixel side of the VQGAN image; default the
    VQGAN's `config.resolution`, 256 for OFA's; a multiple of the downsampling factor). Result:
    `{"image", "images", "logprobs"}`: all `num_return_sequences` samples, most likely first
    (summed code log-probability under the model; OFA reranks with CLIP instead), `image` the first.
    """

    generation: dict[str, Any] = field(default_factory=lambda: dict(_OFA_DECODING))
    metric: str = "psnr"
    options: tuple[str, ...] = ("vqgan", "image_size")

    def image_size(self, vqgan: VQGANModel, options: dict[str, Any]) -> int:
        size = int(options.get("image_size") or vqgan.config.resolution)
        vqgan.code_grid(size, size)
        return size

    def generate_kwargs(self, config, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        """The sampling settings alone: `generate_codes` restricts decoding to codes (no text-only ban)."""
        return dict(self.generation)

    def grid_side(self, vqgan: VQGANModel, options: dict[str, Any]) -> int:
        """Side of the code grid the decoder generates."""
        raise NotImplementedError

    def code_grid_side(self, meta: dict[str, Any]) -> int:
        return self.grid_side(_need_vqgan(self, meta), meta.get("options") or {})

    def run(self, model, inputs: dict, tokenizer, options: dict[str, Any], generate_kwargs: dict[str, Any]) -> list:
        vqgan = resolve_vqgan(options.get("vqgan"), model)
        side = self.grid_side(vqgan, options)
        code_range = (model.config.code_offset, model.config.code_offset + vqgan.config.n_embed)
        if "pixel_values" in inputs:
            inputs = {**inputs, "pixel_values": self.prepare_pixels(inputs["pixel_values"])}
        kwargs = {**self.generate_kwargs(model.config, tokenizer, options), **generate_kwargs,
                  **self.guidance(model, inputs, tokenizer, options)}
        tokens, logprobs = generate_codes(model, inputs, code_range, side, tokenizer.eos_token_id, **kwargs)
        return [CodeSamples(t, lp.tolist(), vqgan, side) for t, lp in zip(tokens, logprobs)]

    def guidance(self, model, inputs: dict, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        """Extra `generate_codes` arguments for classifier-free guidance (none by default)."""
        return {}

    def postprocess(self, raw: CodeSamples, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        """Decode every sample; ValueError for a wrong code count or non-code tokens."""
        codes = tokens_to_codes(raw.tokens, tokenizer.code_offset, raw.vqgan.config.n_embed, raw.side**2)
        codes = codes.reshape(-1, raw.side, raw.side).to(raw.vqgan.device)  # (k, side, side)
        with torch.inference_mode():
            images = pixels_to_images(raw.vqgan.decode(self.full_grid(codes, raw.vqgan, meta)))
        logprobs = list(raw.logprobs) if raw.logprobs is not None else [0.0] * len(images)
        order = sorted(range(len(images)), key=lambda i: -logprobs[i])
        return {"image": images[order[0]], "images": [images[i] for i in order],
                "logprobs": [float(logprobs[i]) for i in order]}

    def full_grid(self, codes: torch.Tensor, vqgan: VQGANModel, meta: dict[str, Any]) -> torch.Tensor:
        """The generated codes (k, side, side) -> the code grids to decode (k, h, w)."""
        return codes

    def pipeline_call(self, example: dict[str, Any], labels: list[str] | None = None) -> dict[str, Any]:
        return {"text": example["text"]} if example.get("text") else {}

    def metric_pair(self, result: dict[str, Any], example: dict[str, Any]) -> tuple[Any, Any]:
        return result.get("image"), example.get("image")

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        """(prompt, target): the target is the generated region's codes as `<code_k>` tokens."""
        return self.prompt(example.get("text"), style), self.target_text(example, meta)

    def target_text(self, example: dict[str, Any], meta: dict[str, Any]) -> str:
        """The example image's VQGAN codes of the generated region, as `<code_k>` tokens."""
        vqgan = _need_vqgan(self, meta)
        if example.get("image") is None:
            raise ValueError(f"task {self.name!r}: a training example needs its image (the target)")
        size = self.image_size(vqgan, meta.get("options") or {})
        codes = vqgan.encode(image_to_pixels(load_image(example["image"]), size, vqgan))[0]  # (n, n)
        return code_text(self.target_codes(codes))

    def target_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The whole image's codes (n, n) -> the codes the decoder generates."""
        return codes


@dataclass
class TextToImageTask(ImageGenTask):
    """Caption -> image; the prompt is the only input (OFA: no image in the encoder).

    Extra option `guidance_scale` (default 1: none): classifier-free guidance against the prompt with an
    empty caption (see `ofa_ufo.generation.codes.CodeGuidance`); useful on models trained with
    `caption_dropout` (training config), which teaches that unconditional prompt. A training example
    whose text is "" is such an unconditional example.
    """

    options: tuple[str, ...] = ("vqgan", "image_size", "guidance_scale")
    source_options: tuple[str, ...] = ("caption_dropout",)

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        if not text or not text.strip():
            raise ValueError("task 'text_to_image' needs a caption: pass text='...'")
        return super().prompt(text, style)

    def unconditional_prompt(self, style: str = DEFAULT_STYLE) -> str:
        """The prompt with an empty caption: what caption dropout trains and guidance contrasts with."""
        return format_prompt(self.name, style, text="")

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        text = example.get("text")
        prompt = self.unconditional_prompt(style) if text == "" else self.prompt(text, style)
        return prompt, self.target_text(example, meta)

    def guidance(self, model, inputs: dict, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        scale = options.get("guidance_scale")
        if scale is None or float(scale) == 1.0:
            return {}
        prompt = self.unconditional_prompt(options.get("style", DEFAULT_STYLE))
        unconditional = tokenizer([prompt], return_tensors="pt")
        unconditional = {k: unconditional[k].to(model.device) for k in ("input_ids", "attention_mask")}
        if "task_ids" in inputs:
            unconditional["task_ids"] = inputs["task_ids"][:1]
        return {"guidance_scale": float(scale), "unconditional": unconditional}

    def request_prompt(self, meta: dict[str, Any], style: str = DEFAULT_STYLE) -> str:
        if meta.get("original_size") is not None:
            raise ValueError("task 'text_to_image' takes no input image: pass None as the image")
        return self.prompt(meta["text"], style)

    def encoder_image(self, example: dict[str, Any]):
        return None  # the example's image is the target

    def grid_side(self, vqgan: VQGANModel, options: dict[str, Any]) -> int:
        return self.image_size(vqgan, options) // vqgan.downsample_factor

    def training_source(self, source, seed: int, options: Mapping[str, Any]):
        """`source` with `caption_dropout` of its draws turned into unconditional examples."""
        rate = options["caption_dropout"]
        return CaptionDropout(source, rate, seed) if rate else source


class CaptionDropout:
    """Draw k of `source` with its caption replaced by "" (text_to_image's unconditional prompt) for a
    fixed `rate` of the draws, chosen by (seed, k) so that a resumed run drops the same ones."""

    def __init__(self, source, rate: float, seed: int) -> None:
        self.source, self.rate, self.seed = source, rate, seed
        self.task = source.task

    def __len__(self) -> int:
        return len(self.source)

    def draw(self, k: int) -> dict[str, Any]:
        example = self.source.draw(k)
        if np.random.default_rng((self.seed, zlib.crc32(b"caption_dropout"), k)).random() < self.rate:
            return {**example, "text": ""}
        return example


@dataclass
class ImageInfillTask(ImageGenTask):
    """Image with its central half blanked -> the centre's codes, pasted into the image's own codes.

    The returned images are `image_size` x `image_size` (the input is resized to that square first).
    """

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        return format_prompt(self.name, style)

    def request_prompt(self, meta: dict[str, Any], style: str = DEFAULT_STYLE) -> str:
        if meta.get("image") is None:
            raise ValueError("task 'image_infill' needs an input image")
        return self.prompt(None, style)

    def grid_side(self, vqgan: VQGANModel, options: dict[str, Any]) -> int:
        size = self.image_size(vqgan, options)
        side = size // vqgan.downsample_factor
        if side % 4:
            raise ValueError(f"image_infill regenerates the central half of the code grid, so the grid side "
                             f"must be a multiple of 4: image_size={size} gives {side}; use a multiple of "
                             f"{4 * vqgan.downsample_factor}")
        return side // 2

    def prepare_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Blank the central half (OFA zeroes the normalised pixels, i.e. mid-grey)."""
        height, width = pixel_values.shape[-2:]
        top, left = height // 4, width // 4
        pixel_values = pixel_values.clone()
        pixel_values[..., top : height - top, left : width - left] = 0.0
        return pixel_values

    def full_grid(self, codes: torch.Tensor, vqgan: VQGANModel, meta: dict[str, Any]) -> torch.Tensor:
        side = codes.shape[-1]
        pixels = image_to_pixels(meta["image"], 2 * side * vqgan.downsample_factor, vqgan)
        grid = vqgan.encode(pixels).repeat(codes.shape[0], 1, 1)  # (k, 2 side, 2 side)
        start = side // 2
        grid[:, start : start + side, start : start + side] = codes
        return grid

    def target_codes(self, codes: torch.Tensor) -> torch.Tensor:
        side = codes.shape[-1] // 2
        start = side // 2
        return codes[start : start + side, start : start + side]


def _need_vqgan(task: Task, meta: dict[str, Any]) -> VQGANModel:
    if meta.get("vqgan") is None:
        raise ValueError(f"task {task.name!r} encodes its training targets with a VQGAN: set the training "
                         "config field `vqgan: DIR` (a VQGANModel.save_pretrained directory), or pass "
                         "build_batch(..., vqgan=VQGANModel)")
    return meta["vqgan"]

