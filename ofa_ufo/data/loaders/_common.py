"""Shared loader machinery: the row driver with ``on_error``, the load report, field helpers, and
the restricted reader of the pickles some datasets ship (RefCOCO's ``refs(unc).p``)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from PIL import Image

from ofa_ufo.data.canonical import DataError, validate_example
from ofa_ufo.core.images import load_image

logger = logging.getLogger("ofa_ufo.data.loaders")

OnError = Literal["raise", "skip"]
Size = tuple[int, int]
# A builder turns one raw record into (canonical example, known image size or None).
Builder = Callable[[Any, int], tuple[dict[str, Any], Size | None]]
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
MAX_LOGGED_ERRORS = 5
PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")  # RefCOCO's refs(unc).p, OFA's trainval_ans2label.pkl
# what a truncated or malformed pickle raises while loading
_UNREADABLE_PICKLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError)


@dataclass
class LoadReport:
    """What one load did: rows yielded, rows skipped, and the first few skip reasons."""

    source: str = ""
    loaded: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def skip(self, error: DataError) -> None:
        self.skipped += 1
        if len(self.errors) < MAX_LOGGED_ERRORS:
            self.errors.append(str(error))

    def log(self) -> None:
        """Warn once at the end of a load that skipped rows, so skips are never silent."""
        if self.skipped:
            first = "\n  ".join(self.errors)
            logger.warning("%s: loaded %d examples, skipped %d bad rows; first errors:\n  %s",
                           self.source, self.loaded, self.skipped, first)


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def drive(
    rows: Iterable[tuple[int, Any]], build: Builder, source: str, on_error: OnError,
    report: LoadReport | None,
) -> Iterator[dict[str, Any]]:
    """Build and validate each (row number, raw record); raise or skip-and-count bad ones."""
    report = report if report is not None else LoadReport()
    report.source = report.source or source
    for row, raw in rows:
        try:
            example = build_row(build, raw, row, source)
        except DataError as err:
            if on_error == "raise":
                raise
            report.skip(err)
            continue
        report.loaded += 1
        yield example
    report.log()


def build_row(build: Builder, raw: Any, row: int, source: str) -> dict[str, Any]:
    """One raw record -> a validated canonical example, or a DataError naming source, row and field
    (the step `drive` takes per row; streams take it only for the records they use)."""
    example, size = build(raw, row)
    return validate_example(example, source, row, size)


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline), streaming; blank lines are skipped."""
    with open(path, encoding="utf-8", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def read_json(path: str | os.PathLike) -> Any:
    """A whole JSON file (COCO/VQA annotation files are single JSON documents)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(str(path), None, "<file>", f"not valid JSON ({err})") from err


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global (see `_PlainDataUnpickler`)."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Reads only plain data: lists, tuples, dicts, strings, bytes, numbers, booleans and None.

    Those are built by pickle opcodes of their own and need no global, so every global a pickle
    names (a class, or a callable such as ``os.system`` that a crafted pickle would run) is
    refused before it is even imported.
    """

    def find_class(self, module: str, name: str) -> NoReturn:
        raise _RefusedGlobal(f"the pickle names the global {module}.{name}")


def _text(value: Any) -> Any:
    """Python 2 ``str`` (read as bytes) -> str, UTF-8 else Latin-1, through lists, tuples and dicts."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, list):
        return [_text(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_text(item) for item in value)
    if isinstance(value, dict):
        return {_text(key): _text(item) for key, item in value.items()}
    return value


def read_pickle(path: str | os.PathLike) -> Any:
    """A pickle of plain data (as distributed: RefCOCO refs, OFA's ans2label), never running code.

    Python 2 pickles (protocol 0-2, ``str`` as bytes) decode too. A pickle that names any global
    (a class, a function) raises a DataError naming the file: such a file is crafted or foreign.
    """
    try:
        with open(path, "rb") as handle:
            return _text(_PlainDataUnpickler(handle, encoding="bytes").load())
    except _RefusedGlobal as err:
        raise DataError(str(path), None, "<file>", f"refused to unpickle: {err}; only plain lists, dicts, strings "
                        "and numbers are read (nothing in the file was run)") from None
    except _UNREADABLE_PICKLE as err:
        raise DataError(str(path), None, "<file>", f"not a readable pickle ({type(err).__name__}: {err})") from None


def read_document(path: str | os.PathLike) -> Any:
    """A whole file of plain data: a pickle (by its suffix, `PICKLE_SUFFIXES`) or JSON."""
    return read_pickle(path) if str(path).lower().endswith(PICKLE_SUFFIXES) else read_json(path)


def json_list(document: Any, key: str, source: str) -> list[Any]:
    """`document[key]` as a list, or a DataError naming the missing/wrong top-level key."""
    value = document.get(key) if isinstance(document, Mapping) else None
    if not isinstance(value, list):
        raise DataError(source, None, key, "missing top-level list")
    return value


def require(
    record: Any, key: str, source: str, row: int, kind: type | tuple[type, ...] = str, field_name: str = "",
) -> Any:
    """`record[key]`, checked present and of type `kind`, else a DataError naming the field.

    `field_name` names the field in the message when it is not just `key` (nested records).
    """
    name = field_name or key
    if not isinstance(record, Mapping):
        raise DataError(source, row, name, f"expected a JSON object holding it, got {type(record).__name__}")
    if key not in record:
        raise DataError(source, row, name, "missing")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise DataError(source, row, name, f"expected {_kind_name(kind)}, got {type(value).__name__} {value!r:.60}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def decode_base64_image(text: str, source: str, row: int, field_name: str = "image") -> Image.Image:
    """Standard or urlsafe base64 (padding optional) -> RGB PIL image, or a DataError."""
    data = text.strip().translate(_URLSAFE_TO_STANDARD)
    data += "=" * (-len(data) % 4)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise DataError(source, row, field_name, f"not valid base64 ({err})") from err
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return load_image(image)
    except _DECODE_ERRORS as err:
        raise DataError(source, row, field_name, f"base64 data is not a readable image ({err})") from err


def image_path(root: str | os.PathLike, name: str) -> str:
    """Absolute, normalised path of image `name` under `root`."""
    return os.path.normpath(os.path.abspath(Path(root) / name))
