"""The canonical example: one plain dict per sample, the single format every loader yields.

Every loader in :mod:`ofa_ufo.data.loaders` turns its source format into these dicts, so
training and evaluation code reads one shape whatever the dataset. Every key is always
present (``None`` when it does not apply):

=============  ==========================  ================================================
key            type                        meaning
=============  ==========================  ================================================
``id``         ``str``                     unique sample id within its source
``task``       ``str``                     one of :data:`CANONICAL_TASKS` (the task registry);
                                           the task's ``example_fields`` must be set
``image``      ``str`` | PIL | ``None``    image file path, or a decoded RGB PIL image
                                           (text_to_image: the image to generate)
``text``       ``str`` | ``None``          prompt side: question, referring expression or
                                           hypothesis
``target``     ``str`` | ``None``          answer side: caption, answer, class name or
                                           entailment label
``references`` ``list[str]`` | ``None``    all reference targets (VQA's 10 human answers,
                                           several captions of one image)
``box``        ``[x0, y0, x1, y1]`` | None  grounding box, original-image pixels
``boxes``      ``list[box]`` | ``None``    detection boxes, same convention
``labels``     ``list[str]`` | ``None``    detection labels, one per box
``premise``    ``str`` | ``None``          visual entailment premise (image caption)
``meta``       ``dict`` | ``None``         JSON-able source ids (image_id, question_id...)
=============  ==========================  ================================================

On disk the canonical format is JSON Lines, one example per line, ``image`` a path relative
to the ``.jsonl`` file (or absolute).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from PIL import Image

from ofa_ufo.tasks import get_task, list_tasks
from ofa_ufo.tasks.choice import ChoiceTask
from ofa_ufo.tasks.embedding import EmbeddingTask

__all__ = [
    "CANONICAL_TASKS", "FIELDS", "IDENTITY_TASKS", "DataError", "new_example", "validate_example",
]

CANONICAL_TASKS: tuple[str, ...] = tuple(list_tasks())  # the registry's tasks (free prompts are no dataset task)
# Embedding tasks (the AllInOne retrieval tasks) -> the kind of object whose identity they learn
IDENTITY_TASKS: dict[str, str] = {
    name: get_task(name).identity_kind for name in CANONICAL_TASKS if isinstance(get_task(name), EmbeddingTask)
}
FIELDS: tuple[str, ...] = (
    "id", "task", "image", "text", "target", "references", "box", "boxes", "labels", "premise", "meta",
)
# Tasks whose target is one of a fixed set of class names: the labels of the registered choice tasks.
_TARGET_CHOICES: dict[str, tuple[str, ...]] = {
    name: tuple(get_task(name).classes) for name in CANONICAL_TASKS if isinstance(get_task(name), ChoiceTask)
}
_STRING_FIELDS = ("id", "task", "text", "target", "premise")
_Fail = Callable[[str, str], NoReturn]


class DataError(ValueError):
    """A bad record; the message names the source file, the row and the field."""

    def __init__(self, source: str, row: int | None, field: str, problem: str) -> None:
        self.source, self.row, self.field, self.problem = str(source), row, field, problem
        where = self.source if row is None else f"{self.source}, row {row}"
        super().__init__(f"{where}, field {field!r}: {problem}")


def new_example(**fields: Any) -> dict[str, Any]:
    """A canonical dict with every key present; unknown keys are a programming error."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown canonical field(s): {unknown}")
    return {name: fields.get(name) for name in FIELDS}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _box_problem(box: Any, size: tuple[int, int] | None) -> str | None:
    """Why `box` is not a valid x0,y0,x1,y1 pixel box inside an image of `size`, or None."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        return f"expected 4 finite numbers [x0, y0, x1, y1], got {box!r}"
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        return f"box {list(box)} has x1 < x0 or y1 < y0"
    if x0 < 0 or y0 < 0:
        return f"box {list(box)} has negative coordinates"
    if size is not None and (x1 > size[0] or y1 > size[1]):
        return f"box {list(box)} lies outside the image (width, height) = {tuple(size)}"
    return None


def _check_strings(example: Mapping[str, Any], fail: _Fail) -> None:
    """String fields are str or None, and never blank when given."""
    for name in _STRING_FIELDS:
        value = example[name]
        if value is not None and not isinstance(value, str):
            fail(name, f"expected a string, got {type(value).__name__}")
        if isinstance(value, str) and not value.strip():
            fail(name, "is empty")


def _check_string_list(example: Mapping[str, Any], name: str, fail: _Fail) -> None:
    value = example[name]
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        fail(name, f"expected a list of non-empty strings, got {value!r}")


def _check_boxes(example: Mapping[str, Any], size: tuple[int, int] | None, fail: _Fail) -> None:
    """`box` and each of `boxes` valid; `labels` one per box."""
    if example["box"] is not None and (problem := _box_problem(example["box"], size)):
        fail("box", problem)
    boxes = example["boxes"]
    if boxes is None:
        return
    if not isinstance(boxes, list):
        fail("boxes", f"expected a list of boxes, got {type(boxes).__name__}")
    for i, box in enumerate(boxes):
        if problem := _box_problem(box, size):
            fail(f"boxes[{i}]", problem)
    labels = example["labels"]
    if labels is not None and len(labels) != len(boxes):
        fail("labels", f"{len(labels)} labels for {len(boxes)} boxes")


def _check_image(example: Mapping[str, Any], fail: _Fail) -> None:
    image = example["image"]
    if image is not None and not isinstance(image, (str, Image.Image)):
        fail("image", f"expected a file path (str) or a PIL image, got {type(image).__name__}")
    if isinstance(image, str) and not image.strip():
        fail("image", "is an empty path")


def _check_task(example: Mapping[str, Any], fail: _Fail) -> None:
    """Known task, and the fields it needs are present."""
    task = example["task"]
    if task not in CANONICAL_TASKS:
        fail("task", f"unknown task {task!r}; expected one of {list(CANONICAL_TASKS)}")
    for need in get_task(task).example_fields:
        names = need if isinstance(need, tuple) else (need,)
        if all(example[name] is None for name in names):
            fail(names[0], f"is required for task {task!r}" + (f" (or {names[1:]})" if len(names) > 1 else ""))
    choices = _TARGET_CHOICES.get(task)
    if choices and example["target"] not in choices:
        fail("target", f"{task} label {example['target']!r} not in {list(choices)}")


def validate_example(
    example: Mapping[str, Any], source: str, row: int | None, image_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Check one canonical example; return it as a plain dict, or raise :class:`DataError`.

    ``image_size`` (width, height) bounds the boxes; when omitted, a PIL ``image`` gives it
    and a path image leaves boxes unbounded on the right/bottom (files are not opened here).
    """

    def fail(field: str, problem: str) -> NoReturn:
        raise DataError(source, row, field, problem)

    if not isinstance(example, Mapping):
        fail("<record>", f"expected a dict, got {type(example).__name__}")
    missing = [name for name in FIELDS if name not in example]
    if missing:
        fail(missing[0], "missing")
    _check_strings(example, fail)
    if example["id"] is None:
        fail("id", "is required")
    _check_task(example, fail)
    _check_image(example, fail)
    _check_string_list(example, "references", fail)
    _check_string_list(example, "labels", fail)
    if example["meta"] is not None and not isinstance(example["meta"], dict):
        fail("meta", f"expected a dict, got {type(example['meta']).__name__}")
    if image_size is None and isinstance(example["image"], Image.Image):
        image_size = example["image"].size
    _check_boxes(example, image_size, fail)
    return dict(example)

