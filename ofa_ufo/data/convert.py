"""Convert any supported dataset format to canonical JSON Lines.

    python -m ofa_ufo.data.convert --format coco_captions --input captions_val2014.json \\
        --images val2014/ --output coco_val.jsonl [--on-error skip]

Images that arrive decoded (base64 in TSV, PIL from ``datasets``) are written as PNG files
into ``<output stem>_images/`` next to the output; the JSONL names images by paths relative
to itself when they lie under its folder, absolute otherwise. The output is written to a
temporary file and renamed at the end, so a failed run leaves no half-written dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from ofa_ufo.data.canonical import DataError
from ofa_ufo.data.loaders import (
    TSV_LAYOUTS, LoadReport, load_coco_captions, load_coco_instances, load_hf_dataset, load_image_folder,
    load_identity_folder, load_jsonl, load_lfw_pairs, load_market1501, load_msmt17, load_ofa_tsv, load_refcoco, load_snli_ve, load_sop,
    load_veri776, load_vqa_v2,
)
from ofa_ufo.data.loaders.reid import LFW_IMAGE_PATTERN, REID_SPLITS

__all__ = ["FORMATS", "main", "write_jsonl"]

Opener = Callable[[argparse.Namespace, LoadReport], Iterator[dict[str, Any]]]


def _need(args: argparse.Namespace, *names: str) -> None:
    """Fail like argparse when a format's required option is missing."""
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"convert: --format {args.format} needs {', '.join(missing)}")


def _hf(args: argparse.Namespace, report: LoadReport) -> Iterator[dict[str, Any]]:
    """A dataset saved with ``save_to_disk`` (a folder) or a local parquet/json/jsonl/csv file."""
    import datasets

    _need(args, "task", "columns")
    path = Path(args.input)
    readers = {".parquet": datasets.Dataset.from_parquet, ".json": datasets.Dataset.from_json,
               ".jsonl": datasets.Dataset.from_json, ".csv": datasets.Dataset.from_csv}
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    elif path.suffix in readers:
        dataset = readers[path.suffix](str(path))
    else:
        raise SystemExit(f"convert: --format hf reads a save_to_disk folder or one of {sorted(readers)}")
    columns = dict(pair.split("=", 1) for pair in args.columns.split(","))
    return load_hf_dataset(dataset, args.task, columns, args.id_column, str(path), args.on_error, report)


def _tsv(args: argparse.Namespace, report: LoadReport) -> Iterator[dict[str, Any]]:
    _need(args, "layout")
    return load_ofa_tsv(args.input, args.layout, args.selected_cols, args.on_error, report)


def _vqa(args: argparse.Namespace, report: LoadReport) -> Iterator[dict[str, Any]]:
    _need(args, "annotations", "images")
    return load_vqa_v2(args.input, args.annotations, args.images, args.image_pattern, args.on_error, report)


def _refcoco(args: argparse.Namespace, report: LoadReport) -> Iterator[dict[str, Any]]:
    _need(args, "annotations", "images")
    return load_refcoco(args.input, args.annotations, args.images, args.split, args.on_error, report)


def _with_images(loader: Callable[..., Iterator[dict[str, Any]]]) -> Opener:
    """Formats read as (input, images root)."""
    def open_(args: argparse.Namespace, report: LoadReport) -> Iterator[dict[str, Any]]:
        _need(args, "images")
        return loader(args.input, args.images, on_error=args.on_error, report=report)
    return open_


def _reid(loader: Callable[..., Iterator[dict[str, Any]]]) -> Opener:
    """ReID roots: --input is the dataset folder, --split optionally keeps some splits (query,gallery)."""
    def open_(args: argparse.Namespace, report: LoadReport) -> Iterator[dict[str, Any]]:
        splits = args.split.split(",") if args.split else REID_SPLITS
        return loader(args.input, splits, on_error=args.on_error, report=report)
    return open_


def _lfw(args: argparse.Namespace, report: LoadReport) -> Iterator[dict[str, Any]]:
    _need(args, "images")
    pattern = args.image_pattern or LFW_IMAGE_PATTERN
    return load_lfw_pairs(args.input, args.images, pattern, on_error=args.on_error, report=report)


def _identity_folder(args: argparse.Namespace, report: LoadReport) -> Iterator[dict[str, Any]]:
    _need(args, "task")
    return load_identity_folder(args.input, args.task, on_error=args.on_error, report=report)


FORMATS: dict[str, Opener] = {
    "jsonl": lambda args, report: load_jsonl(args.input, args.on_error, report),
    "ofa_tsv": _tsv,
    "coco_captions": _with_images(load_coco_captions),
    "coco_instances": _with_images(load_coco_instances),
    "vqa_v2": _vqa,
    "refcoco": _refcoco,
    "image_folder": lambda args, report: load_image_folder(args.input, on_error=args.on_error, report=report),
    "snli_ve": _with_images(load_snli_ve),
    "hf": _hf,
    "market1501": _reid(load_market1501),
    "msmt17": _reid(load_msmt17),
    "veri776": _reid(load_veri776),
    "lfw_pairs": _lfw,
    "sop": lambda args, report: load_sop(args.input, args.images, args.split, args.on_error, report),
    "identity_folder": _identity_folder,
}


def _image_field(image: Any, folder: Path, image_dir: Path, index: int) -> str | None:
    """Save a PIL image as PNG; name any image by a path relative to `folder` when inside it."""
    if isinstance(image, Image.Image):
        image_dir.mkdir(parents=True, exist_ok=True)
        target = image_dir / f"{index:08d}.png"
        image.save(target)
        image = str(target)
    if image is None:
        return None
    absolute = Path(os.path.abspath(image))
    return absolute.relative_to(folder).as_posix() if absolute.is_relative_to(folder) else str(absolute)


def write_jsonl(examples: Iterable[dict[str, Any]], output: str | os.PathLike, progress: bool = True) -> int:
    """Write canonical examples as JSON Lines (images as above); returns how many were written."""
    out = Path(os.path.abspath(output))
    out.parent.mkdir(parents=True, exist_ok=True)
    image_dir, partial = out.parent / f"{out.stem}_images", out.with_name(out.name + ".partial")
    count = 0
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            for example in tqdm(examples, desc=f"writing {out.name}", unit=" examples", disable=None if progress else True):
                record = {**example, "image": _image_field(example["image"], out.parent, image_dir, count)}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.data.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--input", required=True, help="source file (questions/refs file for vqa_v2/refcoco) or folder")
    parser.add_argument("--output", required=True, help="canonical .jsonl to write")
    parser.add_argument("--images", help="image root folder (COCO, VQA, RefCOCO, SNLI-VE, LFW; sop: default the "
                        "list's folder)")
    parser.add_argument("--annotations", help="vqa_v2: annotations file; refcoco: instances.json")
    parser.add_argument("--layout", choices=sorted(TSV_LAYOUTS), help="ofa_tsv: which OFA TSV")
    parser.add_argument("--selected-cols", help="ofa_tsv: OFA-style column ids, e.g. 0,4,2")
    parser.add_argument("--split", help="refcoco: keep one split (train, val, testA, ...); market1501/msmt17/veri776: "
                        "keep splits (e.g. query,gallery); sop: the meta split (default from the file name)")
    parser.add_argument("--image-pattern", help="vqa_v2: image file name pattern, e.g. "
                        "COCO_val2014_{image_id:012d}.jpg; lfw_pairs: default {name}/{name}_{number:04d}.jpg")
    parser.add_argument("--task", help="hf: the canonical task; identity_folder: the embedding task (face, ...)")
    parser.add_argument("--columns", help="hf: field=column pairs, e.g. image=img,text=question,target=answer")
    parser.add_argument("--id-column", help="hf: column holding the example id")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; a bad row (with --on-error raise) exits 1 with the row's error."""
    args = _parser().parse_args(argv)
    report = LoadReport()
    try:
        count = write_jsonl(FORMATS[args.format](args, report), args.output, progress=not args.quiet)
    except (DataError, FileNotFoundError, ValueError) as err:  # bad data or a bad option (e.g. --task)
        print(f"convert: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} examples to {args.output} (skipped {report.skipped} bad rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
