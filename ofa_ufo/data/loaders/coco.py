"""COCO-format JSON: captions, instances (detection) and RefCOCO-style refs over instances.

COCO annotation files are single JSON documents (RefCOCO's refs a pickle), so each is read whole;
examples are still yielded one by one. Boxes come as COCO ``[x, y, width, height]`` and leave as
``[x0, y0, x1, y1]``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from ofa_ufo.data.canonical import DataError, new_example
from ofa_ufo.data.loaders._common import (
    LoadReport, OnError, Size, check_on_error, drive, image_path, json_list, read_document, read_json, require,
)

__all__ = ["load_coco_captions", "load_coco_instances", "load_refcoco"]

Record = Mapping[str, Any]


def _index(records: list[Any], key: str = "id") -> dict[Any, Record]:
    """Records by `key`; malformed records are left for the row that uses them to report."""
    return {r[key]: r for r in records if isinstance(r, Mapping) and key in r}


def _image(images: dict[Any, Record], image_id: Any, root: str, source: str, row: int) -> tuple[str, Size | None]:
    """(absolute path, (width, height) when the entry gives it) of image `image_id`."""
    entry = images.get(image_id)
    if entry is None:
        raise DataError(source, row, "image_id", f"no entry with id {image_id!r} in 'images'")
    name = require(entry, "file_name", source, row, field_name=f"images[id={image_id}].file_name")
    width, height = entry.get("width"), entry.get("height")
    size = (width, height) if isinstance(width, int) and isinstance(height, int) else None
    return image_path(root, name), size


def xywh_to_xyxy(bbox: Any, source: str, row: int, field: str) -> list[float]:
    """COCO [x, y, w, h] -> [x0, y0, x1, y1], rounded to COCO's 2 decimals (no float spill past the edge)."""
    numbers = isinstance(bbox, list) and len(bbox) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    if not numbers:
        raise DataError(source, row, field, f"expected [x, y, width, height] numbers, got {bbox!r:.80}")
    x, y, w, h = (float(v) for v in bbox)
    return [round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)]


def load_coco_captions(
    path: str | os.PathLike, images_root: str | os.PathLike, on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """One caption example per entry of ``annotations`` in a ``captions_*.json`` file.

    Rows are 1-based positions in the ``annotations`` list; images resolve under ``images_root``.
    """
    check_on_error(on_error)
    source = str(path)
    document = read_json(path)
    images = _index(json_list(document, "images", source))
    root = str(images_root)

    def build(ann: Any, row: int) -> tuple[dict[str, Any], Size | None]:
        caption = require(ann, "caption", source, row)
        image_id = require(ann, "image_id", source, row, int)
        image, size = _image(images, image_id, root, source, row)
        example = new_example(id=str(ann.get("id", row)), task="caption", image=image,
                              target=caption.strip(), meta={"image_id": image_id})
        return example, size

    return drive(enumerate(json_list(document, "annotations", source), 1), build, source, on_error, report)


def _group_annotations(annotations: list[Any], include_crowd: bool) -> dict[Any, list[tuple[int, Record]]]:
    """image_id -> [(1-based annotation position, annotation)], crowd regions optional."""
    groups: dict[Any, list[tuple[int, Record]]] = defaultdict(list)
    for position, ann in enumerate(annotations, 1):
        if isinstance(ann, Mapping) and (include_crowd or not ann.get("iscrowd")):
            groups[ann.get("image_id")].append((position, ann))
    return groups


def load_coco_instances(
    path: str | os.PathLike, images_root: str | os.PathLike, include_crowd: bool = False,
    on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """One detection example per entry of ``images`` in an ``instances_*.json`` file.

    Boxes are converted to xyxy, labels are category names; ``iscrowd`` regions are dropped
    unless ``include_crowd``. Rows are 1-based positions in ``images``; a bad annotation
    is reported as ``annotations[k]`` (1-based) on its image's row.
    """
    check_on_error(on_error)
    source, root = str(path), str(images_root)
    document = read_json(path)
    images = json_list(document, "images", source)
    by_id = _index(images)
    categories = {c["id"]: c.get("name") for c in _index(json_list(document, "categories", source)).values()}
    groups = _group_annotations(json_list(document, "annotations", source), include_crowd)

    def build(entry: Any, row: int) -> tuple[dict[str, Any], Size | None]:
        image_id = require(entry, "id", source, row, (int, str))
        image, size = _image(by_id, image_id, root, source, row)
        boxes, labels = [], []
        for position, ann in groups.get(image_id, []):
            boxes.append(xywh_to_xyxy(ann.get("bbox"), source, row, f"annotations[{position}].bbox"))
            label = categories.get(ann.get("category_id"))
            if not isinstance(label, str):
                raise DataError(source, row, f"annotations[{position}].category_id",
                                f"no category named for id {ann.get('category_id')!r}")
            labels.append(label)
        ann_ids = [ann.get("id") for _, ann in groups.get(image_id, [])]
        return new_example(id=str(image_id), task="detection", image=image, boxes=boxes, labels=labels,
                           meta={"image_id": image_id, "annotation_ids": ann_ids}), size

    return drive(enumerate(images, 1), build, source, on_error, report)


def _sentence_rows(refs: list[Any], split: str | None) -> Iterator[tuple[int, tuple[Any, int | None]]]:
    """(ref position, (ref, sentence index)) per sentence; (ref, None) when sentences are unusable."""
    for row, ref in enumerate(refs, 1):
        if split is not None and isinstance(ref, Mapping) and ref.get("split") != split:
            continue
        sentences = ref.get("sentences") if isinstance(ref, Mapping) else None
        if not isinstance(sentences, list) or not sentences:
            yield row, (ref, None)
            continue
        for k in range(len(sentences)):
            yield row, (ref, k)


def _refs_list(path: str | os.PathLike, source: str) -> list[Any]:
    """The refs as distributed (a pickled list, read without running code) or a JSON export: a bare
    list, or an object with a "refs" list."""
    document = read_document(path)
    if isinstance(document, list):
        return document
    return json_list(document, "refs", source)


def load_refcoco(
    refs_path: str | os.PathLike, instances_path: str | os.PathLike, images_root: str | os.PathLike,
    split: str | None = None, on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """One grounding example per referring sentence of RefCOCO, RefCOCO+ or RefCOCOg.

    ``refs_path`` is the refs file as distributed, ``refs(unc).p`` (``refs(umd).p`` for RefCOCOg):
    a pickled list of refs with ``ref_id``, ``image_id``, ``ann_id``, ``split`` and
    ``sentences[].sent`` (``sent_id``), read by a restricted unpickler that refuses any pickle
    naming a class or function, so a crafted file cannot run code; Python 2 pickles decode. A
    ``.json`` export of the same list (or ``{"refs": [...]}``) reads too. Boxes (``bbox``) and image
    files come from the COCO ``instances.json`` shipped beside it. ``split`` keeps only refs of that
    split ("train", "val", "testA", ...). Rows are 1-based positions in the refs list.
    """
    check_on_error(on_error)
    source, root = str(refs_path), str(images_root)
    refs = _refs_list(refs_path, source)
    instances = read_json(instances_path)
    images = _index(json_list(instances, "images", str(instances_path)))
    anns = _index(json_list(instances, "annotations", str(instances_path)))

    def build(item: tuple[Any, int | None], row: int) -> tuple[dict[str, Any], Size | None]:
        ref, k = item
        ann_id = require(ref, "ann_id", source, row, (int, str))
        if k is None:
            raise DataError(source, row, "sentences", "expected a non-empty list of {'sent': ...}")
        sentence = ref["sentences"][k]
        text = require(sentence, "sent", source, row, field_name=f"sentences[{k}].sent")
        if ann_id not in anns:
            raise DataError(source, row, "ann_id", f"no annotation with id {ann_id!r} in {instances_path}")
        image, size = _image(images, require(ref, "image_id", source, row, (int, str)), root, source, row)
        box = xywh_to_xyxy(anns[ann_id].get("bbox"), source, row, "bbox")
        sent_id = sentence.get("sent_id") if isinstance(sentence, Mapping) else None
        meta = {"ref_id": ref.get("ref_id"), "ann_id": ann_id, "image_id": ref["image_id"], "split": ref.get("split")}
        return new_example(id=str(sent_id if sent_id is not None else f"{ref.get('ref_id', row)}_{k}"),
                           task="grounding", image=image, text=text.strip(), box=box, meta=meta), size

    return drive(_sentence_rows(refs, split), build, source, on_error, report)
