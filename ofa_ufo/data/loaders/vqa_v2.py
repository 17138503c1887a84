"""VQA v2 JSON: a questions file plus an annotations file (10 human answers per question), and the
closed answer vocabulary OFA decodes over (the 3,129 most frequent training answers)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ofa_ufo.data.canonical import DataError, new_example
from ofa_ufo.data.loaders._common import (
    LoadReport, OnError, Size, check_on_error, drive, image_path, json_list, read_document, read_json, require,
)
from ofa_ufo.metrics.vqa import normalize_vqa_answer

__all__ = [
    "VQA_ANSWER_VOCABULARY_SIZE", "build_answer_vocabulary", "load_vqa_v2", "read_answer_vocabulary",
    "write_answer_vocabulary",
]

VQA_ANSWER_VOCABULARY_SIZE = 3129  # OFA's trainval_ans2label


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


def build_answer_vocabulary(
    annotations_path: str | os.PathLike, size: int = VQA_ANSWER_VOCABULARY_SIZE,
) -> list[str]:
    """The `size` most frequent answers of a VQA v2 annotations file, most frequent first (ties in
    alphabetical order): each question's ``multiple_choice_answer`` (else its most common human
    answer) after the VQA metric's normalisation, as OFA's trie answer set (trainval_ans2label).
    Build it from the training annotations; a bad annotation raises a DataError naming its row."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"the answer vocabulary size must be a positive integer, got {size!r}")
    source = str(annotations_path)
    counts: Counter[str] = Counter()
    for row, annotation in enumerate(json_list(read_json(annotations_path), "annotations", source), 1):
        target, _ = _answers(annotation, source, row)
        answer = normalize_vqa_answer(target)
        if answer:
            counts[answer] += 1
    return sorted(counts, key=lambda answer: (-counts[answer], answer))[:size]


def write_answer_vocabulary(answers: Sequence[str], path: str | os.PathLike) -> None:
    """Write the vocabulary as a JSON list in rank order (written to a temporary file, then renamed)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(list(answers), ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    partial.replace(target)


def read_answer_vocabulary(path: str | os.PathLike) -> list[str]:
    """An answer vocabulary file: a JSON list (as written by `write_answer_vocabulary`), or an
    ``{answer: label}`` mapping as JSON or as OFA's ``trainval_ans2label.pkl`` (read without running
    code), ordered by label."""
    source = str(path)
    document = read_document(path)
    if isinstance(document, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in document.values()):
        document = sorted(document, key=document.get)
    if not isinstance(document, list) or not document or not all(isinstance(a, str) and a.strip() for a in document):
        raise DataError(source, None, "<file>", "expected a non-empty list of answers, or an {answer: label} mapping")
    return document
