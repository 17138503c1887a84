"""The files of a `save_pretrained` directory, read once before transformers reads them, so that a
truncated, non-JSON or wrong-type file fails with its path and what is wrong.

transformers' own errors for such a file name none: a bare `JSONDecodeError` ("Expecting value: line 1
column 1"), a `UnicodeDecodeError`, or an `AttributeError` when the file holds a list instead of an object.
A corrupt `generation_config.json` is even skipped in silence (the model then decodes with defaults).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

__all__ = [
    "CONFIG_FILES", "GENERATION_FILES", "IMAGE_PROCESSOR_FILES", "SavedFileError", "TOKENIZER_FILES",
    "check_files", "check_saved_model", "local_directory", "naming_files", "read_json_object", "tokenizer_files",
]

CONFIG_FILES = ("config.json",)
GENERATION_FILES = ("generation_config.json",)
IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
VOCAB_FILES = ("vocab.json", "merges.txt")  # read only when there is no tokenizer.json
FIX = "the file is truncated or corrupt: save the model again, or copy the file again from where it came"


class SavedFileError(OSError, ValueError):
    """A file of a saved model directory that cannot be used; the message names the file and what is wrong.

    An `OSError`, as transformers' own "not a valid JSON file" error, and a `ValueError`, as the errors of
    the settings it wraps (an unregistered task, a bad box mode), so existing `except` clauses keep working."""


def local_directory(name_or_path: str | os.PathLike, subfolder: str | None = None) -> Path | None:
    """The local folder `from_pretrained` reads, or None for a Hub id (whose files are not checked here)."""
    path = Path(name_or_path) / (subfolder or "")
    return path if path.is_dir() else None


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or a `SavedFileError` saying why the file is not one."""
    data = path.read_bytes()
    if not data.strip():
        raise SavedFileError(f"{path} is empty; {FIX}")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise SavedFileError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); {FIX}") from error
    except json.JSONDecodeError as error:
        raise SavedFileError(f"{path} is not valid JSON ({error}); {FIX}") from error
    if not isinstance(value, dict):
        raise SavedFileError(f"{path} holds a JSON {_json_type(value)}; expected a JSON object ({{\"name\": value, ...}}) "
                             "as save_pretrained writes it")
    return value


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_text(path: Path) -> None:
    """A text file (merges.txt) must at least decode as UTF-8."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SavedFileError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); {FIX}") from error


def check_files(directory: Path | None, names: Iterable[str]) -> None:
    """Read each of `names` present in `directory`: a .json file must hold a JSON object, a .txt file UTF-8 text.
    Absent files are left to the loader (some are optional); `directory=None` (a Hub id) checks nothing."""
    if directory is None:
        return
    for name in names:
        path = directory / name
        if path.is_file():
            read_json_object(path) if name.endswith(".json") else _check_text(path)


def tokenizer_files(directory: Path | None) -> tuple[str, ...]:
    """The tokenizer files a load reads: vocab.json and merges.txt only where no tokenizer.json replaces them."""
    if directory is not None and not (directory / "tokenizer.json").is_file():
        return TOKENIZER_FILES + VOCAB_FILES
    return TOKENIZER_FILES


def _check_weights(directory: Path) -> None:
    """Open each safetensors file's header: a truncated or foreign file fails here, naming it."""
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise SavedFileError(f"cannot read the weights {path}: {error}; {FIX}") from error


def check_saved_model(directory: str | os.PathLike) -> None:
    """Check every file a pipeline loads from a saved model directory: config, generation config, processor
    and tokenizer files, and the weights' headers (not a missing file: the loaders say which one they need)."""
    folder = local_directory(directory)
    if folder is None:
        return
    check_files(folder, CONFIG_FILES + GENERATION_FILES + IMAGE_PROCESSOR_FILES + tokenizer_files(folder))
    _check_weights(folder)


BUILD_ERRORS = (ValueError, TypeError, KeyError, AttributeError)


@contextmanager
def naming_files(directory: Path | None, names: Iterable[str], what: str,
                 errors: tuple[type[Exception], ...] = BUILD_ERRORS) -> Iterator[None]:
    """Re-raise an error from building `what` out of well-formed files (a field of the wrong type or value;
    the error names the field but not the file) as a `SavedFileError` naming the files it was built from.
    The original error stays chained (`raise ... from error`)."""
    try:
        yield
    except OSError:  # a SavedFileError, or transformers' missing-file error: it names its file already
        raise
    except errors as error:
        present = [str(directory / name) for name in names if directory is not None and (directory / name).is_file()]
        if not present:
            raise
        raise SavedFileError(f"cannot build {what} from {', '.join(present)}: {error}") from error
