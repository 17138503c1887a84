"""COCO captions on the Karpathy split: ``dataset_coco.json`` of Karpathy's ``caption_datasets``.

The file is one JSON document, ``{"images": [...], "dataset": "coco"}``; each image has
``filepath`` (``train2014`` / ``val2014``), ``filename``, ``imgid``, ``cocoid``, ``split`` (one of
``train``, ``restval``, ``val``, ``test``) and ``sentences[]`` (``raw``, ``tokens``, ``sentid``).
OFA fine-tunes on ``train`` + ``restval`` (113,287 images) and reports the 5,000 ``test`` images.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ofa_ufo.data.canonical import DataError, new_example
from ofa_ufo.data.loaders._common import (
    LoadReport, OnError, Size, check_on_error, drive, image_path, json_list, read_json, require,
)

__all__ = ["KARPATHY_SPLITS", "KARPATHY_UNITS", "karpathy_splits", "load_coco_karpathy"]

KARPATHY_SPLITS: tuple[str, ...] = ("train", "restval", "val", "test")
# one example per image (all its sentences as references: evaluation) or per sentence (training)
KARPATHY_UNITS: tuple[str, ...] = ("image", "caption")


def karpathy_splits(split: str | Sequence[str]) -> tuple[str, ...]:
    """``"train,restval"`` or ``["train", "restval"]`` -> the split names, checked."""
    names = tuple(s.strip() for s in (split.split(",") if isinstance(split, str) else split))
    unknown = [name for name in names if name not in KARPATHY_SPLITS]
    if not names or unknown:
        raise ValueError(f"Karpathy split must be one or more of {list(KARPATHY_SPLITS)} (comma-separated, "
                         f"e.g. train,restval), got {split!r}")
    return names


def _sentences(entry: Any, source: str, row: int) -> list[str]:
    """The image's raw sentences, whitespace stripped."""
    sentences = require(entry, "sentences", source, row, list)
    if not sentences:
        raise DataError(source, row, "sentences", "expected a non-empty list of {'raw': ...}")
    return [require(s, "raw", source, row, field_name=f"sentences[{k}].raw").strip() for k, s in enumerate(sentences)]


def _image(entry: Any, root: str, source: str, row: int) -> tuple[str, Any]:
    """(image path ``<root>/<filepath>/<filename>``, COCO id): ``filepath`` may be absent (Flickr files)."""
    name = require(entry, "filename", source, row)
    folder = entry.get("filepath") or ""
    if not isinstance(folder, str):
        raise DataError(source, row, "filepath", f"expected a folder name such as 'val2014', got {folder!r:.60}")
    image_id = entry.get("cocoid", entry.get("imgid"))
    if image_id is None:
        raise DataError(source, row, "cocoid", "missing (and no imgid)")
    return image_path(root, os.path.join(folder, name)), image_id


def _rows(images: list[Any], splits: tuple[str, ...], per: str) -> Iterator[tuple[int, tuple[Any, int | None]]]:
    """(image position, (image entry, sentence index or None for the whole image)) of the chosen splits."""
    for row, entry in enumerate(images, 1):
        if isinstance(entry, Mapping) and entry.get("split") not in splits:
            continue
        sentences = entry.get("sentences") if isinstance(entry, Mapping) else None
        if per == "image" or not isinstance(sentences, list) or not sentences:
            yield row, (entry, None)
            continue
        for k in range(len(sentences)):
            yield row, (entry, k)


def load_coco_karpathy(
    path: str | os.PathLike, images_root: str | os.PathLike, split: str | Sequence[str] = "test",
    per: str = "image", on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Caption examples of the Karpathy split(s) `split` (``"train,restval"`` is OFA's training set).

    ``per="image"``: one example per image, ``target`` its first raw sentence and ``references``
    all of them (evaluation; id = ``cocoid``). ``per="caption"``: one example per sentence (id =
    ``sentid``), ``references`` still the image's sentences (what SCST rewards against). Images
    are ``<images_root>/<filepath>/<filename>``. Rows are 1-based positions in ``images``.
    """
    check_on_error(on_error)
    splits = karpathy_splits(split)
    if per not in KARPATHY_UNITS:
        raise ValueError(f"per must be one of {list(KARPATHY_UNITS)}, got {per!r}")
    source, root = str(path), str(images_root)
    images = json_list(read_json(path), "images", source)

    def build(item: tuple[Any, int | None], row: int) -> tuple[dict[str, Any], Size | None]:
        entry, k = item
        references = _sentences(entry, source, row)
        image, image_id = _image(entry, root, source, row)
        meta = {"image_id": image_id, "split": entry.get("split")}
        if k is None:
            return new_example(id=str(image_id), task="caption", image=image, target=references[0],
                               references=references, meta=meta), None
        sent_id = entry["sentences"][k].get("sentid")
        return new_example(id=str(sent_id if sent_id is not None else f"{image_id}_{k}"), task="caption", image=image,
                           target=references[k], references=references, meta=meta), None

    return drive(_rows(images, splits, per), build, source, on_error, report)
