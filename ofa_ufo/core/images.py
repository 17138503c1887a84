"""Image loading: any path, URL, PIL image or uint8 array -> an RGB PIL image, or a clear `ImageLoadError`.

Shared by the processor, the pipeline, the data loaders and the metrics, so every entry point
accepts the same inputs and fails with the same messages.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from huggingface_hub.utils import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BLIND_GREY", "IMAGE_SUFFIXES", "URL_TIMEOUT_S", "ImageLike", "ImageLoadError", "blind_examples",
           "load_image"]

ImageLike = str | os.PathLike | Image.Image | np.ndarray
_ALPHA_MODES = {"LA", "PA", "RGBA", "RGBa", "La"}
_URL_SCHEMES = ("http://", "https://")
URL_TIMEOUT_S = 10.0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # a folder's image files


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image; the message names the input and why."""


def _decode(source: Path | BinaryIO, where: str) -> Image.Image:
    """Open and fully decode an image, so truncated data fails here and not later."""
    try:
        with Image.open(source) as image:
            image.load()  # decodes everything; PIL raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
            return image
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{where}: not an image file that PIL can read") from err
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{where}: cannot decode image (truncated or corrupt file?): {err}") from err


def _open_file(path: Path) -> Image.Image:
    """Decode an image file, naming the path when it is missing or not a file."""
    if not path.exists():
        raise ImageLoadError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageLoadError(f"image path is not a file: {path}")
    return _decode(path, str(path))


def _fetch(url: str, timeout: float | None) -> Image.Image:
    """Download and decode an image URL with the HTTP client transformers' `load_image` uses
    (redirects followed); any failure names the URL and why it could not be fetched."""
    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPStatusError as err:
        raise ImageLoadError(f"could not fetch image URL {url}: HTTP {err.response.status_code} "
                             f"{err.response.reason_phrase}") from err
    except httpx.TimeoutException as err:
        raise ImageLoadError(f"could not fetch image URL {url}: no answer within {timeout} s") from err
    except httpx.HTTPError as err:
        raise ImageLoadError(f"could not fetch image URL {url} (offline or refused?): {err}") from err
    return _decode(io.BytesIO(response.content), url)


def _from_array(array: np.ndarray) -> Image.Image:
    """Wrap an HxW, HxWx1, HxWx3 or HxWx4 uint8 array as a PIL image."""
    where = f"numpy array of shape {array.shape} and dtype {array.dtype}"
    if array.dtype != np.uint8:
        raise ImageLoadError(f"{where}: expected dtype uint8 (values 0..255)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageLoadError(f"{where}: expected shape HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA)")
    if array.size == 0:
        raise ImageLoadError(f"{where}: image has no pixels")
    return Image.fromarray(np.ascontiguousarray(array))


def _deep_gray_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float gray image to 8 bits, as RGB (rules in ``load_image``)."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode == "I":
        low, high = values.min(), values.max()
        if low < 0 or high > 65535:
            values, scale = values - low, max(high - low, 1.0)
        else:
            scale = 65535.0
    elif image.mode == "F":
        scale = max(values.max(), 1.0)
    else:
        scale = 65535.0
    gray = np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def _to_rgb(image: Image.Image, where: str) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited onto white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return _deep_gray_to_rgb(image)
    try:
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:
        raise ImageLoadError(f"{where}: cannot convert PIL mode {image.mode!r} to RGB ({err})") from err


def load_image(image: ImageLike, timeout: float | None = URL_TIMEOUT_S) -> Image.Image:
    """Turn a path, an ``http://`` or ``https://`` URL, a PIL image or a uint8 array into an
    upright RGB PIL image.

    URLs are accepted as transformers' ``load_image`` accepts them (fetched with the same client,
    waiting at most ``timeout`` seconds; None waits forever), then decoded like files.
    EXIF orientation is applied and every PIL mode is converted:

    * alpha and palette transparency are composited onto white (a transparent region reads
      as a white page, not as black);
    * 16-bit ``I;16*``: 0..65535 maps linearly to 0..255 (PIL's own convert clips at 255);
    * 32-bit ``I``: read as 16-bit data when all values lie in 0..65535 (16-bit PNG/TIFF),
      otherwise the image's min..max maps to 0..255;
    * float ``F``: taken as [0, 1] when its maximum is <= 1, else divided by the maximum;
      negative values and NaN become 0.

    Raises :class:`ImageLoadError` naming the input on anything that is not a readable,
    non-empty image, and naming the URL when one could not be fetched (offline, refused,
    an HTTP error status, a timeout).
    """
    if isinstance(image, str) and image.startswith(_URL_SCHEMES):
        pil, where = _fetch(image, timeout), image
    elif isinstance(image, (str, os.PathLike)):
        pil, where = _open_file(Path(image)), str(image)
    elif isinstance(image, Image.Image):
        pil, where = image, f"PIL image (mode {image.mode}, size {image.size})"
    elif isinstance(image, np.ndarray):
        pil, where = _from_array(image), f"numpy array of shape {image.shape}"
    else:
        raise ImageLoadError(
            f"unsupported image input of type {type(image).__name__}: "
            "expected a file path, an http(s) URL, a PIL image or an HxWxC uint8 numpy array"
        )
    if pil.width == 0 or pil.height == 0:
        raise ImageLoadError(f"{where}: image has no pixels (width x height = {pil.width} x {pil.height})")
    return _to_rgb(ImageOps.exif_transpose(pil), where)


BLIND_GREY = (128, 128, 128)


def blind_examples(examples: list[dict]) -> list[dict]:
    """Copies of `examples` with every image replaced by a constant grey one of the same size: the blind
    baseline, what a model earns from the prompt alone. An image that cannot be read is kept, so that it
    fails (and is counted) as in the real evaluation."""
    blind = []
    for example in examples:
        image = example.get("image")
        if image is not None:
            try:
                image = Image.new("RGB", load_image(image).size, BLIND_GREY)
            except ImageLoadError:
                image = example["image"]  # fails again where it is scored
        blind.append({**example, "image": image})
    return blind
