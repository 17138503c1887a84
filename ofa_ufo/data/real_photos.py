"""A handful of real photographs with hand-written labels, for demos and smoke tests.

Generated shapes show that training works; real photos show what a model does on the
images people care about. The photos ship inside scikit-image (`skimage.data`, no network),
so only their labels live here, in `assets/real_photos/labels.json`: per photo its loader,
pixel size, a caption, question/answer pairs, objects with [x0, y0, x1, y1] boxes in
original pixels, and a class label. Install with `pip install 'ofa-ufo[demo]'`.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

from ofa_ufo.data.canonical import CANONICAL_TASKS, new_example, validate_example

__all__ = ["LABELS_FILE", "load_real_photos", "photo_labels", "real_photo_examples"]

LABELS_FILE = "assets/real_photos/labels.json"
EXTRA = "demo"  # the setup.py extra that installs the photos' package
_LOADER = re.compile(r"skimage\.data\.(\w+)\(\)(?:\[(\d+)\])?")


@cache
def photo_labels() -> dict[str, dict[str, Any]]:
    """The hand-written labels, keyed by photo name (read once)."""
    text = resources.files("ofa_ufo").joinpath(LABELS_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _skimage_data() -> Any:
    """`skimage.data`, or an ImportError that says which extra to install."""
    try:
        import skimage.data  # the optional [demo] extra
    except ImportError as error:
        raise ImportError(
            f"real photos come from scikit-image: pip install 'ofa-ufo[{EXTRA}]' "
            "(or pip install scikit-image)"
        ) from error
    return skimage.data


def load_photo(name: str) -> Image.Image:
    """One photo as an RGB PIL image, via the loader call its labels name."""
    labels = photo_labels()[name]
    match = _LOADER.fullmatch(labels["source"]["loader"])
    if match is None:
        raise ValueError(f"photo {name!r}: unsupported loader {labels['source']['loader']!r}")
    pixels = getattr(_skimage_data(), match.group(1))()
    if match.group(2) is not None:
        pixels = pixels[int(match.group(2))]
    image = Image.fromarray(np.asarray(pixels)).convert("RGB")
    if list(image.size) != labels["size"]:
        raise ValueError(f"photo {name!r} is {image.size}, labels expect {labels['size']}: "
                         "the installed scikit-image ships a different image")
    return image


def _grounding(name: str, labels: dict[str, Any]) -> list[dict[str, Any]]:
    """One example per object whose label is unique in the photo ("the cup")."""
    names = [o["label"] for o in labels["objects"]]
    return [
        dict(id=f"{name}/grounding/{i}", task="grounding", text=f"the {o['label']}",
             box=o["box"], boxes=[o["box"]])
        for i, o in enumerate(labels["objects"]) if names.count(o["label"]) == 1
    ]


def _photo_examples(name: str, labels: dict[str, Any]) -> list[dict[str, Any]]:
    """Every task's examples for one photo, as canonical field dicts without the image."""
    objects = labels["objects"]
    return [
        dict(id=f"{name}/caption", task="caption", target=labels["caption"],
             references=[labels["caption"]]),
        *(dict(id=f"{name}/vqa/{i}", task="vqa", text=qa["question"], target=qa["answer"])
          for i, qa in enumerate(labels["qa"])),
        *_grounding(name, labels),
        dict(id=f"{name}/detection", task="detection", boxes=[o["box"] for o in objects],
             labels=[o["label"] for o in objects]),
        dict(id=f"{name}/classification", task="classification", target=labels["class"]),
    ]


def load_real_photos() -> list[dict[str, Any]]:
    """Validated canonical examples (caption, vqa, grounding, detection, classification)
    for every labelled photo; ids are "<photo>/<task>[/<n>]"."""
    examples = []
    for name, labels in photo_labels().items():
        image = load_photo(name)
        for fields in _photo_examples(name, labels):
            meta = {"photo": name, "source": dict(labels["source"])}
            example = new_example(**fields, image=image, meta=meta)
            examples.append(validate_example(example, LABELS_FILE, len(examples)))
    return examples


def real_photo_examples(task: str) -> list[dict[str, Any]]:
    """The real-photo examples of one canonical task."""
    if task not in CANONICAL_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(CANONICAL_TASKS)}")
    return [e for e in load_real_photos() if e["task"] == task]
