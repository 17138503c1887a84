"""Write canonical examples as JSON Lines, the on-disk canonical format (see :mod:`ofa_ufo.data.canonical`).

Images that arrive decoded (base64 in TSV, PIL from ``datasets``) are written as PNG files into
``<output stem>_images/`` next to the output; the JSONL names images by paths relative to itself
when they lie under its folder, absolute otherwise. The output is written to a temporary file and
renamed at the end, so a failed run leaves no half-written dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

__all__ = ["write_jsonl"]


def _image_field(image: Any, folder: Path, image_dir: Path, index: int) -> str | None:
    """Save a PIL image as PNG; name any image by a path relative to `folder` when inside it."""
    if isinstance(image, Image.Image):
        image_dir.mkdir(parents=True, exist_ok=True)
        target = image_dir / f"{index:08d}.png"
        image.save(target)
        image = str(target)
    if image is None:
        return None
    absolute = Path(os.path.abspath(image))
    return absolute.relative_to(folder).as_posix() if absolute.is_relative_to(folder) else str(absolute)


def write_jsonl(examples: Iterable[dict[str, Any]], output: str | os.PathLike, progress: bool = True) -> int:
    """Write canonical examples as JSON Lines (images as above); returns how many were written."""
    out = Path(os.path.abspath(output))
    out.parent.mkdir(parents=True, exist_ok=True)
    image_dir, partial = out.parent / f"{out.stem}_images", out.with_name(out.name + ".partial")
    count = 0
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            bar = tqdm(examples, desc=f"writing {out.name}", unit=" examples", disable=None if progress else True)
            for example in bar:
                record = {**example, "image": _image_field(example["image"], out.parent, image_dir, count)}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return count
