"""The canonical format on disk: JSON Lines, one canonical example per line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ofa_ufo.data.canonical import FIELDS, DataError, new_example
from ofa_ufo.data.loaders._common import LoadReport, OnError, Size, check_on_error, drive, image_path, iter_lines
from ofa_ufo.data.loaders.snli_ve import parse_json_line

__all__ = ["JsonlRow", "canonical_record", "load_jsonl"]


class JsonlRow:
    """Builds the canonical example of one line of a canonical ``.jsonl`` file: the row parser the eager
    loader and the lazy streams (`ofa_ufo.data.streaming`) share. Picklable, for DataLoader workers."""

    def __init__(self, source: str) -> None:
        self.source, self.folder = source, Path(source).absolute().parent

    def __call__(self, line: str, row: int) -> tuple[dict[str, Any], Size | None]:
        record = parse_json_line(line, self.source, row)
        return canonical_record(record, self.source, row, self.folder), None


def canonical_record(record: Any, source: str, row: int, folder: Path) -> dict[str, Any]:
    """A parsed JSON object -> canonical example; unknown keys are an error, a relative ``image`` path
    resolves against `folder`."""
    if not isinstance(record, dict):
        raise DataError(source, row, "<line>", f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise DataError(source, row, unknown[0], f"unknown field; canonical fields are {list(FIELDS)}")
    example = new_example(**record)
    if isinstance(example["image"], str) and example["image"].strip():
        example["image"] = image_path(folder, example["image"])
    return example


def load_jsonl(
    path: str | os.PathLike, on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream canonical examples from a ``.jsonl`` file written by :mod:`ofa_ufo.data.convert`
    (or by hand). Absent keys read as ``None``; unknown keys are an error (catches typos);
    relative ``image`` paths resolve against the file's folder. Rows are 1-based lines.
    """
    check_on_error(on_error)
    return drive(iter_lines(path), JsonlRow(str(path)), str(path), on_error, report)
