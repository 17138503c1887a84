"""Retrieval datasets of the AllInOne tasks: person / vehicle ReID, face pairs, product retrieval.

One example per image; what the canonical fields lack goes into ``meta`` (JSON-able):

==========================  ===============  ===================================================
loader                      task             ``meta``
==========================  ===============  ===================================================
``load_market1501``         ``reid_person``  ``dataset identity camera split`` (train, query,
``load_msmt17``             ``reid_person``  gallery); cameras numbered as in the file names
``load_veri776``            ``reid_vehicle``
``load_lfw_pairs``          ``face``         ``dataset identity pair side same fold``: two
                                             examples per pair line (side 0 and 1)
``load_sop``                ``product``      ``dataset identity super_class image_id split``
``load_identity_folder``    any of the four  ``dataset identity split`` (``train``): one folder
                                             per identity (face training sets, VeRi-Wild...)
==========================  ===============  ===================================================

These ``meta`` dicts are the references of the ``reid``, ``verification`` and ``recall@k``
metrics (:mod:`ofa_ufo.metrics.retrieval`). Image files are not opened while loading.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ofa_ufo.data.canonical import IDENTITY_TASKS, DataError, new_example
from ofa_ufo.data.loaders._common import LoadReport, OnError, Size, check_on_error, drive, image_path, iter_lines
from ofa_ufo.data.loaders.folder import IMAGE_EXTENSIONS, folder_files

__all__ = [
    "LFW_IMAGE_PATTERN", "MARKET1501_FOLDERS", "REID_SPLITS", "VERI776_FOLDERS", "load_identity_folder",
    "load_lfw_pairs", "load_market1501", "load_msmt17", "load_sop", "load_veri776",
]

REID_SPLITS: tuple[str, ...] = ("train", "query", "gallery")
MARKET1501_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
VERI776_FOLDERS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}
LFW_IMAGE_PATTERN = "{name}/{name}_{number:04d}.jpg"
JUNK_IDENTITY = -1
_ID_CAMERA = re.compile(r"^(-1|\d+)_c(\d+)")  # Market-1501, DukeMTMC, VeRi-776: <identity>_c<camera>...
_MSMT_CAMERA = re.compile(r"^\d+_\d+_(\d+)_")  # MSMT17: <identity>_<index>_<camera>_<date+time>_...
_MSMT_LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",),
               "gallery": ("list_gallery.txt",)}
_MSMT_IMAGE_DIRS = {"train": ("train", "mask_train_v2"), "query": ("test", "mask_test_v2"),
                    "gallery": ("test", "mask_test_v2")}  # MSMT17_V1 names, then MSMT17_V2 names
_SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]
Row = tuple[int, Any]


def _check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    unknown = [s for s in splits if s not in REID_SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits must be drawn from {list(REID_SPLITS)}, got {list(splits)}")
    return splits


def _folder(root: Path, name: str, dataset: str, expected: str) -> Path:
    """``root/name``, or a DataError naming the missing folder and the layout expected."""
    folder = root / name
    if not folder.is_dir():
        raise DataError(str(folder), None, "folder", f"missing; a {dataset} root holds {expected}")
    return folder


def _reid_example(dataset: str, task: str, split: str, name: str, image: str, identity: int,
                  camera: int) -> dict[str, Any]:
    meta = {"dataset": dataset, "identity": identity, "camera": camera, "split": split}
    return new_example(id=f"{split}/{name}", task=task, image=image, meta=meta)


# --- Market-1501 / VeRi-776: one folder per split, identity and camera in the file name --------

def _image_files(folders: Mapping[str, Path]) -> Iterator[Row]:
    """(1-based row, (split, image file)) over the split folders, files in sorted order."""
    row = 0
    for split, folder in folders.items():
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                row += 1
                yield row, (split, file)


def _load_camera_folders(
    root: str | os.PathLike, layout: Mapping[str, str], dataset: str, task: str, example_name: str,
    splits: Sequence[str], keep_junk: bool, on_error: OnError, report: LoadReport | None,
) -> Iterator[dict[str, Any]]:
    """Folders of ``<identity>_c<camera>...`` images, one folder per split."""
    check_on_error(on_error)
    base = Path(root).absolute()
    expected = ", ".join(f"{layout[s]}/" for s in REID_SPLITS)
    folders = {split: _folder(base, layout[split], dataset, expected) for split in _check_splits(splits)}

    def build(item: tuple[str, Path], row: int) -> tuple[dict[str, Any], Size | None]:
        split, file = item
        match = _ID_CAMERA.match(file.name)
        if match is None:
            raise DataError(str(file), None, "file name",
                            f"does not parse as <identity>_c<camera>..., e.g. {example_name}")
        identity, camera = int(match[1]), int(match[2])
        return _reid_example(dataset, task, split, file.name, str(file), identity, camera), None

    def rows() -> Iterator[Row]:
        for row, (split, file) in _image_files(folders):
            if keep_junk or not file.name.startswith(f"{JUNK_IDENTITY}_"):
                yield row, (split, file)

    return drive(rows(), build, str(root), on_error, report)


def load_market1501(
    root: str | os.PathLike, splits: Sequence[str] = REID_SPLITS, keep_junk: bool = False,
    on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Market-1501 (or DukeMTMC-reID, same layout): ``bounding_box_train/`` (train),
    ``query/`` and ``bounding_box_test/`` (gallery) under ``root``.

    ``0002_c1s1_000451_03.jpg`` is identity 2 seen by camera 1. Gallery distractors
    (identity 0, ``0000_...``) are kept; junk boxes (identity -1, ``-1_...``) are left out,
    as the reference evaluation does, unless ``keep_junk`` (the ``reid`` metric ignores them
    either way). Rows count images in split then file-name order.
    """
    return _load_camera_folders(root, MARKET1501_FOLDERS, "market1501", "reid_person", "0002_c1s1_000451_03.jpg",
                                splits, keep_junk, on_error, report)


def load_veri776(
    root: str | os.PathLike, splits: Sequence[str] = REID_SPLITS, on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """VeRi-776: ``image_train/``, ``image_query/`` and ``image_test/`` (gallery) under ``root``;
    ``0001_c001_00016450_0.jpg`` is vehicle 1 seen by camera 1."""
    return _load_camera_folders(root, VERI776_FOLDERS, "veri776", "reid_vehicle", "0001_c001_00016450_0.jpg",
                                splits, False, on_error, report)


# --- MSMT17: list files of "<relative path> <identity>" lines ------------------------------------

def _msmt_sources(base: Path, splits: Sequence[str]) -> list[tuple[str, Path, Path]]:
    """(split, list file, image folder) per list file to read; missing ones are DataErrors."""
    sources = []
    for split in splits:
        folders = [base / name for name in _MSMT_IMAGE_DIRS[split] if (base / name).is_dir()]
        if not folders:
            raise DataError(str(base / _MSMT_IMAGE_DIRS[split][0]), None, "folder",
                            f"missing (nor {_MSMT_IMAGE_DIRS[split][1]}/); MSMT17 keeps {split} images there")
        for position, name in enumerate(_MSMT_LISTS[split]):
            if (base / name).is_file():
                sources.append((split, base / name, folders[0]))
            elif position == 0:  # list_val.txt is optional
                raise DataError(str(base / name), None, "<file>", f"missing; MSMT17 lists its {split} images there")
    return sources


def _msmt_line(line: str, source: str, row: int) -> tuple[str, int, int]:
    """``path identity`` (or just ``path``, identity = its folder) -> (path, identity, camera)."""
    fields = line.split()
    if len(fields) not in (1, 2):
        raise DataError(source, row, "<line>", f"expected '<relative image path> <identity>', got {line!r:.80}")
    path = fields[0]
    identity = fields[1] if len(fields) == 2 else Path(path).parts[0]
    if not re.fullmatch(r"\d+", identity):
        raise DataError(source, row, "identity", f"expected a non-negative integer, got {identity!r}")
    match = _MSMT_CAMERA.match(Path(path).name)
    if match is None:
        raise DataError(source, row, "file name", f"{Path(path).name!r} does not parse as "
                        "<identity>_<index>_<camera>_..., e.g. 0000_000_01_0303morning_0015_0.jpg")
    return path, int(identity), int(match[1])


def load_msmt17(
    root: str | os.PathLike, splits: Sequence[str] = REID_SPLITS, on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """MSMT17 (V1 or V2): ``list_train.txt`` (+ ``list_val.txt`` when present, which the usual
    protocol adds to training), ``list_query.txt``, ``list_gallery.txt`` of
    ``<path> <identity>`` lines; paths are relative to ``train/`` (train, val) or ``test/``
    (query, gallery), ``mask_train_v2/`` / ``mask_test_v2/`` for V2. A line without an
    identity takes its path's first folder. The camera is the file name's third field:
    ``0000_000_01_0303morning_0015_0.jpg`` is camera 1. Rows are lines of each list file.
    """
    check_on_error(on_error)
    sources = _msmt_sources(Path(root).absolute(), _check_splits(splits))

    def build(item: tuple[str, Path, Path, str], row: int) -> tuple[dict[str, Any], Size | None]:
        split, list_file, folder, line = item
        path, identity, camera = _msmt_line(line, str(list_file), row)
        return _reid_example("msmt17", "reid_person", split, path, image_path(folder, path), identity, camera), None

    def rows() -> Iterator[Row]:
        for split, list_file, folder in sources:
            for row, line in iter_lines(list_file):
                yield row, (split, list_file, folder, line)

    return drive(rows(), build, str(root), on_error, report)


# --- LFW pairs.txt --------------------------------------------------------------------------------

def _lfw_header(line: str | None, source: str) -> tuple[int, int]:
    """``<folds> <pairs per kind per fold>`` (``10 300``), or ``<pairs per kind>`` (one fold)."""
    fields = (line or "").split()
    if not 1 <= len(fields) <= 2 or not all(f.isdigit() and int(f) > 0 for f in fields):
        raise DataError(source, 1, "<header>", f"expected '<folds> <pairs per fold and kind>' "
                        f"such as '10 300', got {line!r}")
    return (1, int(fields[0])) if len(fields) == 1 else (int(fields[0]), int(fields[1]))


def _lfw_pair(line: str, source: str, row: int, same: bool, per_fold: int) -> list[tuple[str, int]]:
    """[(name, number), (name, number)] of one pair line of the kind its position requires."""
    fields = line.split()
    expected = "same-person line 'name n1 n2'" if same else "different-person line 'name1 n1 name2 n2'"
    where = f"the {'first' if same else 'last'} {per_fold} lines of each fold"
    if len(fields) != (3 if same else 4) or not all(fields[i].isdigit() for i in ((1, 2) if same else (1, 3))):
        raise DataError(source, row, "<line>", f"expected a {expected} ({where}), got {line!r:.80}")
    if same:
        return [(fields[0], int(fields[1])), (fields[0], int(fields[2]))]
    return [(fields[0], int(fields[1])), (fields[2], int(fields[3]))]


def _lfw_rows(path: str | os.PathLike, source: str) -> Iterator[Row]:
    """(line, pair item) twice per pair line (sides 0, 1), or (line, DataError) once per bad line."""
    lines = iter_lines(path)
    header = next(lines, (1, None))
    folds, per_fold = _lfw_header(header[1], source)
    count = 0
    for count, (row, line) in enumerate(lines, start=1):
        fold, position = divmod(count - 1, 2 * per_fold)
        try:
            pair = _lfw_pair(line, source, row, position < per_fold, per_fold)
        except DataError as err:
            yield row, err
            continue
        for side in (0, 1):
            yield row, (count - 1, fold, position < per_fold, pair, side)
    if count != folds * 2 * per_fold:
        raise DataError(source, None, "<file>", f"the header '{header[1]}' announces {folds} x {2 * per_fold} "
                        f"pair lines, found {count}")


def load_lfw_pairs(
    path: str | os.PathLike, images_root: str | os.PathLike, image_pattern: str = LFW_IMAGE_PATTERN,
    on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """LFW's ``pairs.txt``: a header ``10 300`` (folds, pairs per kind), then per fold 300
    same-person lines ``name n1 n2`` and 300 different-person lines ``name1 n1 name2 n2``.

    Two ``face`` examples per pair (``meta.side`` 0 and 1), images
    ``image_pattern.format(name=..., number=...)`` under ``images_root``
    (``Abel_Pacheco/Abel_Pacheco_0001.jpg``); ``meta.pair`` is the 0-based pair index,
    ``meta.fold`` its fold. A bad line is one error (skipping drops both sides); a wrong
    header or line count fails the whole load. Rows are lines.
    """
    check_on_error(on_error)
    source = str(path)

    def build(item: tuple[int, int, bool, list[tuple[str, int]], int] | DataError,
              row: int) -> tuple[dict[str, Any], Size | None]:
        if isinstance(item, DataError):
            raise item
        pair, fold, same, members, side = item
        name, number = members[side]
        meta = {"dataset": "lfw", "identity": name, "pair": pair, "side": side, "same": same, "fold": fold}
        image = image_path(images_root, image_pattern.format(name=name, number=number))
        return new_example(id=f"pair{pair}/{side}", task="face", image=image, meta=meta), None

    return drive(_lfw_rows(path, source), build, source, on_error, report)


# --- Stanford Online Products -------------------------------------------------------------------

def _sop_rows(path: str | os.PathLike, source: str) -> Iterator[Row]:
    """Data lines after checking the header line."""
    lines = iter_lines(path)
    row, header = next(lines, (1, ""))
    if header.split() != _SOP_HEADER:
        raise DataError(source, row, "<header>", f"expected the header {' '.join(_SOP_HEADER)!r}, got {header!r:.80}")
    yield from lines


def load_sop(
    path: str | os.PathLike, images_root: str | os.PathLike | None = None, split: str | None = None,
    on_error: OnError = "raise", report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Stanford Online Products ``Ebay_train.txt`` / ``Ebay_test.txt``: a header
    ``image_id class_id super_class_id path``, then one image per line; ``meta.identity`` is
    the product (``class_id``). Paths are relative to ``images_root`` (default: the list
    file's folder). ``split`` defaults to ``train`` / ``test`` from the file name. Rows are lines.
    """
    check_on_error(on_error)
    source = str(path)
    root = Path(path).absolute().parent if images_root is None else images_root
    name = Path(path).name.lower()
    split = split or ("train" if "train" in name else "test" if "test" in name else None)

    def build(line: str, row: int) -> tuple[dict[str, Any], Size | None]:
        fields = line.split()
        if len(fields) != 4 or not all(f.isdigit() for f in fields[:3]):
            raise DataError(source, row, "<line>", f"expected 'image_id class_id super_class_id path' "
                            f"(three integers and a path), got {line!r:.80}")
        image_id, class_id, super_class = (int(f) for f in fields[:3])
        meta = {"dataset": "sop", "identity": class_id, "super_class": super_class, "image_id": image_id,
                "split": split}
        return new_example(id=str(image_id), task="product", image=image_path(root, fields[3]), meta=meta), None

    return drive(_sop_rows(path, source), build, source, on_error, report)


# --- one folder per identity (face training sets such as MS1MV3 / CASIA-WebFace unpacked to JPEGs) ----

def load_identity_folder(
    root: str | os.PathLike, task: str, dataset: str | None = None, on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """``root/<identity>/<image>``: one folder per identity, as AllInOne reads its face training set
    (MS1MV3 unpacked to JPEGs) and VeriAll. Training examples of `task` (one of the embedding tasks);
    ``meta.identity`` is the folder name (a string), ``meta.dataset`` `dataset` (default: the root's
    folder name), ``meta.split`` ``train``. Ids are ``<identity>/<file name>``; rows count images in
    folder then file order. Files with other extensions and loose files in ``root`` are ignored.
    """
    check_on_error(on_error)
    if task not in IDENTITY_TASKS:
        raise ValueError(f"task must be one of {list(IDENTITY_TASKS)}, got {task!r}")
    base = Path(root).absolute()
    if not base.is_dir():
        raise DataError(str(base), None, "folder", "missing; expected <root>/<identity>/<image> folders")
    name = dataset or base.name

    def build(item: tuple[str, Path], row: int) -> tuple[dict[str, Any], Size | None]:
        identity, file = item
        meta = {"dataset": name, "identity": identity, "split": "train"}
        return new_example(id=f"{identity}/{file.name}", task=task, image=str(file), meta=meta), None

    return drive(folder_files(base), build, str(root), on_error, report)
