"""SNLI-VE JSON Lines (``snli_ve_{train,dev,test}.jsonl``) over Flickr30k images."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ofa_ufo.data.canonical import DataError, new_example
from ofa_ufo.data.loaders._common import LoadReport, OnError, Size, check_on_error, drive, image_path, iter_lines, require

__all__ = ["load_snli_ve"]


def parse_json_line(line: str, source: str, row: int) -> Any:
    """One JSON Lines record, or a DataError naming the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(source, row, "<line>", f"not valid JSON ({err})") from err


def load_snli_ve(
    path: str | os.PathLike, images_root: str | os.PathLike, image_pattern: str = "{}.jpg",
    on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream visual-entailment examples: ``sentence2`` is the hypothesis (``text``),
    ``sentence1`` the premise, ``gold_label`` the target; the image is
    ``image_pattern.format(Flickr30K_ID)`` under ``images_root``. Rows are 1-based lines.
    """
    check_on_error(on_error)
    source = str(path)

    def build(line: str, row: int) -> tuple[dict[str, Any], Size | None]:
        record = parse_json_line(line, source, row)
        flickr_id = require(record, "Flickr30K_ID", source, row, (str, int))
        example = new_example(
            id=str(record.get("pairID", row)), task="entailment",
            image=image_path(images_root, image_pattern.format(flickr_id)),
            text=require(record, "sentence2", source, row).strip(),
            premise=require(record, "sentence1", source, row).strip(),
            target=require(record, "gold_label", source, row),
        )
        return example, None

    return drive(iter_lines(path), build, source, on_error, report)
