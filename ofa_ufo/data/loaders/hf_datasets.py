"""Any Hugging Face ``datasets.Dataset`` (in memory or loaded from local files), by column mapping."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import Any

from PIL import Image

from ofa_ufo.core.images import ImageLoadError, load_image
from ofa_ufo.data.canonical import FIELDS, DataError, new_example
from ofa_ufo.data.loaders._common import LoadReport, OnError, Size, check_on_error, drive

__all__ = ["HfRow", "hf_row", "load_hf_dataset"]

_LIST_FIELDS = ("references", "boxes", "labels")


def _image_value(value: Any, source: str, row: int) -> Any:
    """A datasets Image cell (PIL when decoded, {"bytes", "path"} when not) -> PIL or path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            try:
                with Image.open(io.BytesIO(value["bytes"])) as image:
                    return load_image(image)
            except (OSError, ImageLoadError) as err:
                raise DataError(source, row, "image", f"bytes are not a readable image ({err})") from err
        value = value.get("path")
    if isinstance(value, Image.Image):
        return load_image(value)
    return value


def _cell(field: str, value: Any, source: str, row: int) -> Any:
    """Arrow cells as canonical values: sequences become lists, boxes lists of floats."""
    if field == "image":
        return _image_value(value, source, row)
    if field in ("id", "target") and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if field in _LIST_FIELDS and isinstance(value, tuple):
        return list(value)
    if field == "box" and isinstance(value, (list, tuple)):
        return list(value)
    return value


class HfRow:
    """Builds the canonical example of one record of a ``datasets`` dataset by column mapping: the row
    parser the eager loader and the lazy streams (`ofa_ufo.data.streaming`) share. Picklable."""

    def __init__(self, task: str, mapping: Mapping[str, str], source: str) -> None:
        self.task, self.mapping, self.source = task, dict(mapping), source

    def __call__(self, record: Mapping[str, Any], row: int) -> tuple[dict[str, Any], Size | None]:
        values = {field: _cell(field, record[column], self.source, row) for field, column in self.mapping.items()}
        values.setdefault("id", str(row))
        return new_example(task=self.task, **values), None


def hf_row(dataset: Any, task: str, columns: Mapping[str, str], id_column: str | None = None,
           source: str | None = None) -> HfRow:
    """The row builder of `dataset` (a ``Dataset`` or an ``IterableDataset``, e.g. ``streaming=True``),
    its column mapping checked against the dataset's columns (where the dataset knows them)."""
    name = source or getattr(getattr(dataset, "info", None), "dataset_name", None) or "datasets.Dataset"
    available = getattr(dataset, "column_names", None)
    mapping = {**columns, **({"id": id_column} if id_column else {})}
    for field, column in mapping.items():
        if field not in FIELDS or field == "task":
            raise ValueError(f"columns maps unknown canonical field {field!r}; expected some of {list(FIELDS)}")
        if available is not None and column not in available:
            raise DataError(name, None, field, f"column {column!r} not in the dataset's columns {list(available)}")
    return HfRow(task, mapping, name)


def load_hf_dataset(
    dataset: Any, task: str, columns: Mapping[str, str], id_column: str | None = None,
    source: str | None = None, on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Canonical examples from a ``datasets.Dataset``, ``columns`` mapping canonical fields to
    its columns, e.g. ``{"image": "img", "text": "question", "target": "answer"}``.

    Integer ids/targets become strings (class-label columns should be mapped to names first,
    e.g. with ``dataset.features[col].int2str``). Ids come from ``id_column`` or the 1-based row.
    A column mapping that names a missing column raises at once, whatever ``on_error``.
    """
    check_on_error(on_error)
    build = hf_row(dataset, task, columns, id_column, source)
    return drive(enumerate(dataset, 1), build, build.source, on_error, report)
