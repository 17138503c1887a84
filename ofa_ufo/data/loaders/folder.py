"""ImageFolder classification: ``root/<class>/<image>``, the class name taken from the folder."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ofa_ufo.core.images import IMAGE_SUFFIXES
from ofa_ufo.data.canonical import DataError, new_example
from ofa_ufo.data.loaders._common import LoadReport, OnError, Size, check_on_error, drive

__all__ = ["IMAGE_EXTENSIONS", "folder_files", "load_image_folder"]

IMAGE_EXTENSIONS = frozenset(IMAGE_SUFFIXES)  # this loader's public name for the one list in ofa_ufo.core.images


def folder_files(root: Path) -> Iterator[tuple[int, tuple[str, Path]]]:
    """(1-based row, (sub-folder name, image file)) under `root/<folder>/<image>`, folders and files in
    sorted order (ImageFolder classes, one-folder-per-identity sets)."""
    row = 0
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                row += 1
                yield row, (class_dir.name, file)


def load_image_folder(
    root: str | os.PathLike, class_names: Mapping[str, str] | None = None, on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """One classification example per image file; files are not opened here.

    ``class_names`` maps folder names to class names (e.g. ``{"n01440764": "tench"}``); without
    it the folder name is the class, underscores read as spaces. Rows count images in
    sorted order; the source named in errors is the image file.
    """
    check_on_error(on_error)
    base = Path(root).absolute()
    if not base.is_dir():
        raise DataError(str(root), None, "root", "not a directory")

    def build(item: tuple[str, Path], row: int) -> tuple[dict[str, Any], Size | None]:
        folder, file = item
        if class_names is not None and folder not in class_names:
            raise DataError(str(file), row, "class", f"folder {folder!r} has no entry in class_names")
        label = class_names[folder] if class_names is not None else folder.replace("_", " ")
        return new_example(id=f"{folder}/{file.name}", task="classification", image=str(file), target=label), None

    return drive(folder_files(base), build, str(root), on_error, report)
