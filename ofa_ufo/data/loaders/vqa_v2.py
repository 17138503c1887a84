"""VQA v2 JSON: a questions file plus an annotations file (10 human answers per question)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ofa_ufo.data.canonical import DataError, new_example
from ofa_ufo.data.loaders._common import (
    LoadReport, OnError, Size, check_on_error, drive, image_path, json_list, read_json, require,
)

__all__ = ["load_vqa_v2"]


def _image_pattern(questions: Any, image_pattern: str | None, source: str) -> str:
    """COCO file names follow the questions file's ``data_subtype`` unless a pattern is given."""
    if image_pattern is not None:
        return image_pattern
    subtype = questions.get("data_subtype") if isinstance(questions, dict) else None
    if not isinstance(subtype, str):
        raise DataError(source, None, "data_subtype", "missing; pass image_pattern to name the image files")
    return f"COCO_{subtype}_{{image_id:012d}}.jpg"


def _answers(annotation: Any, source: str, row: int) -> tuple[str, list[str]]:
    """(target, all human answers): target is ``multiple_choice_answer``, else the most common."""
    field = "answers (annotations file)"
    answers = require(annotation, "answers", source, row, list, field_name=field)
    texts = [a.get("answer") if isinstance(a, dict) else None for a in answers]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise DataError(source, row, field, "expected a non-empty list of {'answer': str}")
    target = annotation.get("multiple_choice_answer") or Counter(texts).most_common(1)[0][0]
    return target, texts


def load_vqa_v2(
    questions_path: str | os.PathLike, annotations_path: str | os.PathLike, images_root: str | os.PathLike,
    image_pattern: str | None = None, on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """One VQA example per question, joined to its annotation by ``question_id``.

    ``image_pattern`` formats ``image_id`` into a file name under ``images_root``; default
    ``COCO_<data_subtype>_{image_id:012d}.jpg``. Rows are 1-based positions in ``questions``.
    """
    check_on_error(on_error)
    source = str(questions_path)
    document = read_json(questions_path)
    pattern = _image_pattern(document, image_pattern, source)
    annotations = {a["question_id"]: a for a in json_list(read_json(annotations_path), "annotations",
                                                          str(annotations_path))
                   if isinstance(a, dict) and "question_id" in a}

    def build(question: Any, row: int) -> tuple[dict[str, Any], Size | None]:
        question_id = require(question, "question_id", source, row, int)
        text = require(question, "question", source, row)
        image_id = require(question, "image_id", source, row, int)
        if question_id not in annotations:
            raise DataError(source, row, "question_id", f"no annotation for question {question_id} in {annotations_path}")
        target, answers = _answers(annotations[question_id], source, row)
        example = new_example(id=str(question_id), task="vqa", image=image_path(images_root, pattern.format(image_id=image_id)),
                              text=text.strip(), target=target, references=answers,
                              meta={"image_id": image_id, "question_id": question_id})
        return example, None

    return drive(enumerate(json_list(document, "questions", source), 1), build, source, on_error, report)
