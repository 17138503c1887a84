"""Data sources: every way to get canonical examples, by name, with typed options.

One registry, :data:`SOURCES`, holds the dataset formats read from disk (a spec's
``data: {format: coco_captions, input: ..., images: ...}``, or ``python -m ofa_ufo.data.convert
--format coco_captions --input ... --images ...``) and the generated demo sources
(``data: {source: demo_scenes}``). :func:`open_examples` opens a spec's ``data:`` mapping for the
``train`` or ``val`` split; evaluation, training and the convert command all read data through this
module. Paths in a spec may use environment variables (``${COCO_ROOT}``).

A source that cannot be opened raises :class:`DataSourceError` (a ``ValueError``) naming the format
or source, the option or file at fault and the form expected; bad rows raise the loaders'
``DataError``. The commands turn both into exit codes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ofa_ufo.data.canonical import IDENTITY_TASKS
from ofa_ufo.data.demo_examples import make_examples
from ofa_ufo.data.demo_identities import DemoIdentities, held_out_examples
from ofa_ufo.data.demo_scenes import DEFAULT_OBJECT_SIZE, DemoScenes
from ofa_ufo.data.loaders import (
    TSV_LAYOUTS, LoadReport, load_coco_captions, load_coco_instances, load_hf_dataset, load_identity_folder,
    load_image_folder, load_jsonl, load_lfw_pairs, load_market1501, load_msmt17, load_ofa_tsv, load_refcoco,
    load_snli_ve, load_sop, load_veri776, load_vqa_v2,
)
from ofa_ufo.data.loaders.reid import LFW_IMAGE_PATTERN, REID_SPLITS

__all__ = [
    "SOURCES", "SPLITS", "DataSourceError", "DemoIdentitiesOptions", "DemoScenesOptions", "Format", "FormatOptions",
    "Generated", "MissingOptionError", "expand_env", "list_sources", "open_examples", "source_of",
]

SPLITS: tuple[str, ...] = ("train", "val")
Examples = Iterator[dict[str, Any]]
_Options = TypeVar("_Options")


class DataSourceError(ValueError):
    """Data that cannot be opened or read; the message names the format (or source), the option or
    file at fault and the form expected."""


class MissingOptionError(DataSourceError):
    """Options a format cannot do without are unset; `needs` maps each to the form expected."""

    def __init__(self, format_name: str, needs: Mapping[str, str]) -> None:
        self.format, self.needs = format_name, dict(needs)
        wanted = "; ".join(f"{option} ({form})" for option, form in needs.items())
        super().__init__(f"format {format_name!r} needs {wanted}")


@dataclass(frozen=True)
class FormatOptions:
    """Where a dataset on disk lies and how to read it: the keys of a spec's ``data:`` and the flags
    of the convert command (``selected_cols`` is ``--selected-cols``). A format needs some of them
    (`Format.needs`) and ignores those it does not read."""

    input: str | None = None  # the source file or folder
    images: str | None = None  # the image root folder
    annotations: str | None = None  # vqa_v2: the annotations file; refcoco: instances.json
    layout: str | None = None  # ofa_tsv: which OFA TSV (one of TSV_LAYOUTS)
    selected_cols: str | None = None  # ofa_tsv: OFA-style column ids, e.g. 0,4,2
    split: str | None = None  # refcoco: one split; ReID roots: some splits (query,gallery); sop: the meta split
    image_pattern: str | None = None  # vqa_v2, lfw_pairs: image file name pattern
    task: str | None = None  # hf: the canonical task; identity_folder: the embedding task
    columns: str | None = None  # hf: field=column pairs, e.g. image=img,text=question,target=answer
    id_column: str | None = None  # hf: the column holding the example id
    on_error: str = "raise"  # "raise" at the first bad row, or "skip" bad rows (counted, logged once)


@dataclass(frozen=True)
class DemoScenesOptions:
    """``data: {source: demo_scenes}``: generated shape scenes (`ofa_ufo.data.demo_scenes`), one example
    of the spec's task per scene; either split holds `val_scenes` scenes."""

    val_scenes: int = 200
    size: int = 256
    seed: int = 0
    max_objects: int = 3
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE


@dataclass(frozen=True)
class DemoIdentitiesOptions:
    """``data: {source: demo_identities}`` (`ofa_ufo.data.demo_identities`): `views` images of each of
    `train_identities` identities to train on; `val_examples` held-out images laid out for the metric."""

    train_identities: int = 1000
    views: int = 8
    val_examples: int = 200
    size: int = 128
    seed: int = 0


_FORMAT_OPTIONS = frozenset(f.name for f in fields(FormatOptions))


@dataclass(frozen=True)
class Format:
    """A dataset format on disk (``data: {format: NAME, ...}``): its loader, and the options it cannot
    do without mapped to the form expected (what an error about them says)."""

    name: str
    load: Callable[[FormatOptions, LoadReport], Examples]
    needs: Mapping[str, str]
    key: ClassVar[str] = "format"

    def options(self, values: Mapping[str, Any]) -> FormatOptions:
        """The typed options among `values` (keys that are no option are left out)."""
        return _typed(FormatOptions, values, f"format {self.name!r}")

    def read(self, options: FormatOptions, report: LoadReport | None = None) -> Examples:
        """The dataset's examples, read lazily; a missing option or input file fails here, at once."""
        missing = {option: form for option, form in self.needs.items() if getattr(options, option) is None}
        if missing:
            raise MissingOptionError(self.name, missing)
        if options.on_error not in ("raise", "skip"):
            raise DataSourceError(f"format {self.name!r} option 'on_error' must be 'raise' or 'skip', "
                                  f"got {options.on_error!r}")
        for option in ("input", "annotations"):
            if option in self.needs and not Path(getattr(options, option)).exists():
                raise DataSourceError(f"format {self.name!r}: {option} {getattr(options, option)} does not exist; "
                                      f"expected {self.needs[option]}")
        return self.load(options, report if report is not None else LoadReport())

    def open(self, data: Mapping[str, Any], task: str, split: str, report: LoadReport | None = None) -> Examples:
        """A spec's ``data:`` (the split's side, see `open_examples`): `${VAR}`s expanded, bad rows
        skipped unless it says ``on_error: raise``."""
        values = {key: expand_env(value) for key, value in data.items() if key in _FORMAT_OPTIONS}
        return self.read(self.options({"on_error": "skip", **values}), report)


@dataclass(frozen=True)
class Generated:
    """A generated demo source (``data: {source: NAME, ...}``): its typed settings and a function of
    (settings, task, split) that makes the examples."""

    name: str
    settings: type
    generate: Callable[[Any, str, str], Examples]
    key: ClassVar[str] = "source"

    def open(self, data: Mapping[str, Any], task: str, split: str, report: LoadReport | None = None) -> Examples:
        """The examples of `task` for `split`, from the settings in ``data:`` (nothing is read, so no report)."""
        return self.generate(_typed(self.settings, data, f"source {self.name!r}"), task, split)


def expand_env(value: Any) -> Any:
    """Substitute environment variables in a spec path; an unset one is named in the error."""
    if not isinstance(value, str):
        return value
    expanded = os.path.expandvars(value)
    unset = re.findall(r"\$\{?(\w+)\}?", expanded)
    if unset:
        raise DataSourceError(f"set the environment variable(s) {unset} used by the data path {value!r}")
    return expanded


def _checked(value: Any, default: Any, what: str) -> Any:
    """`value` as the type of an option's `default` (a string where the default is None)."""
    if isinstance(default, tuple):
        numbers = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if numbers and len(value) == len(default):
            return tuple(float(v) for v in value)
        expected = f"a list of {len(default)} numbers"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif isinstance(value, str):
        return value
    else:
        expected = "a string"
    raise DataSourceError(f"{what} must be {expected}, got {value!r}")


def _typed(cls: type[_Options], values: Mapping[str, Any], where: str) -> _Options:
    """Dataclass `cls` from those keys of `values` that are its fields (None: the default), type-checked."""
    chosen = {option.name: _checked(values[option.name], option.default, f"{where} option {option.name!r}")
              for option in fields(cls) if values.get(option.name) is not None}
    return cls(**chosen)


# ---- the dataset formats ------------------------------------------------------------------------

_IMAGES = "the image root folder"


def _columns(text: str) -> dict[str, str]:
    """``image=img,text=question`` -> {"image": "img", "text": "question"}."""
    pairs = [pair.split("=", 1) for pair in text.split(",")]
    if not all(len(pair) == 2 and all(side.strip() for side in pair) for pair in pairs):
        raise DataSourceError(f"format 'hf' option 'columns' must be field=column pairs, e.g. "
                              f"image=img,text=question,target=answer; got {text!r}")
    return {field.strip(): column.strip() for field, column in pairs}


def _hf(options: FormatOptions, report: LoadReport) -> Examples:
    """A dataset saved with ``save_to_disk`` (a folder) or a local parquet / json / jsonl / csv file."""
    import datasets  # optional heavy dependency: only this format needs it

    columns, path = _columns(options.columns), Path(options.input)
    readers = {".parquet": datasets.Dataset.from_parquet, ".json": datasets.Dataset.from_json,
               ".jsonl": datasets.Dataset.from_json, ".csv": datasets.Dataset.from_csv}
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    elif path.suffix in readers:
        dataset = readers[path.suffix](str(path))
    else:
        raise DataSourceError(f"format 'hf' reads a save_to_disk folder or one of {sorted(readers)}, got input {path}")
    return load_hf_dataset(dataset, options.task, columns, options.id_column, str(path), options.on_error, report)


def _with_images(loader: Callable[..., Examples]) -> Callable[[FormatOptions, LoadReport], Examples]:
    """Formats read as (input, images root)."""
    return lambda options, report: loader(options.input, options.images, on_error=options.on_error, report=report)


def _reid(loader: Callable[..., Examples]) -> Callable[[FormatOptions, LoadReport], Examples]:
    """ReID roots: `input` is the dataset folder; `split` keeps some splits (e.g. query,gallery)."""
    def load(options: FormatOptions, report: LoadReport) -> Examples:
        splits = options.split.split(",") if options.split else REID_SPLITS
        return loader(options.input, splits, on_error=options.on_error, report=report)
    return load


def _lfw(options: FormatOptions, report: LoadReport) -> Examples:
    pattern = options.image_pattern or LFW_IMAGE_PATTERN
    return load_lfw_pairs(options.input, options.images, pattern, on_error=options.on_error, report=report)


# ---- the generated sources ----------------------------------------------------------------------

def _demo_scenes(settings: DemoScenesOptions, task: str, split: str) -> Examples:
    """One example of `task` per scene of the split, ids ``<split>-<index>``."""
    scenes = DemoScenes(split, settings.val_scenes, size=settings.size, seed=settings.seed,
                        max_objects=settings.max_objects, object_size=settings.object_size)
    for index in range(len(scenes)):
        try:
            (example,) = make_examples(scenes[index], scenes.example_rng(index), (task,))
        except KeyError as error:  # a task scenes make no examples of
            raise DataSourceError(f"source 'demo_scenes': {error.args[0]}") from None
        yield {**example, "id": f"{split}-{index}"}


def _demo_identities(settings: DemoIdentitiesOptions, task: str, split: str) -> Examples:
    """The training images, or held-out identities laid out for the task's metric (query / gallery,
    face pairs, product groups)."""
    if split == "train":
        return iter(DemoIdentities(task, "train", settings.train_identities, settings.views, settings.size,
                                   settings.seed))
    return iter(held_out_examples(task, settings.val_examples, settings.size, settings.seed))


SOURCES: dict[str, Format | Generated] = {source.name: source for source in (
    Format("jsonl", lambda o, report: load_jsonl(o.input, o.on_error, report), {"input": "a canonical .jsonl file"}),
    Format("ofa_tsv", lambda o, report: load_ofa_tsv(o.input, o.layout, o.selected_cols, o.on_error, report),
           {"input": "an OFA .tsv file", "layout": f"one of {sorted(TSV_LAYOUTS)}"}),
    Format("coco_captions", _with_images(load_coco_captions),
           {"input": "a COCO captions_*.json file", "images": _IMAGES}),
    Format("coco_instances", _with_images(load_coco_instances),
           {"input": "a COCO instances_*.json file", "images": _IMAGES}),
    Format("vqa_v2", lambda o, report: load_vqa_v2(o.input, o.annotations, o.images, o.image_pattern, o.on_error,
                                                   report),
           {"input": "a VQA v2 questions .json file", "annotations": "the VQA v2 annotations .json file",
            "images": _IMAGES}),
    Format("refcoco", lambda o, report: load_refcoco(o.input, o.annotations, o.images, o.split, o.on_error, report),
           {"input": "a RefCOCO refs.json file", "annotations": "its COCO instances.json file", "images": _IMAGES}),
    Format("image_folder", lambda o, report: load_image_folder(o.input, on_error=o.on_error, report=report),
           {"input": "a folder of <class>/<image> files"}),
    Format("snli_ve", _with_images(load_snli_ve),
           {"input": "an SNLI-VE .jsonl file", "images": "the Flickr30k image folder"}),
    Format("hf", _hf, {"input": "a datasets save_to_disk folder or a .parquet/.json/.jsonl/.csv file",
                       "task": "the canonical task, e.g. vqa",
                       "columns": "field=column pairs, e.g. image=img,text=question,target=answer"}),
    Format("market1501", _reid(load_market1501),
           {"input": "the Market-1501 folder (bounding_box_train/, query/, bounding_box_test/)"}),
    Format("msmt17", _reid(load_msmt17), {"input": "the MSMT17 folder (list_*.txt, train/, test/)"}),
    Format("veri776", _reid(load_veri776), {"input": "the VeRi folder (image_train/, image_query/, image_test/)"}),
    Format("lfw_pairs", _lfw, {"input": "LFW's pairs.txt", "images": "the LFW image folder"}),
    Format("sop", lambda o, report: load_sop(o.input, o.images, o.split, o.on_error, report),
           {"input": "a Stanford Online Products Ebay_*.txt list"}),
    Format("identity_folder", lambda o, report: load_identity_folder(o.input, o.task, on_error=o.on_error,
                                                                     report=report),
           {"input": "a folder of <identity>/<image> files",
            "task": f"the embedding task, one of {list(IDENTITY_TASKS)}"}),
    Generated("demo_scenes", DemoScenesOptions, _demo_scenes),
    Generated("demo_identities", DemoIdentitiesOptions, _demo_identities),
)}


def list_sources(key: str | None = None) -> list[str]:
    """Registered source names, sorted: all, or those a ``data:`` names by `key` ("format" or "source")."""
    return sorted(name for name, source in SOURCES.items() if key in (None, source.key))


def source_of(data: Mapping[str, Any]) -> Format | Generated:
    """The registered source a ``data:`` mapping names: ``source: demo_scenes`` or ``format: coco_captions``."""
    if not isinstance(data, Mapping):
        raise DataSourceError(f"'data' must be a mapping, got {type(data).__name__}")
    for key in ("source", "format"):
        source = SOURCES.get(data[key]) if isinstance(data.get(key), str) else None
        if source is not None and source.key == key:
            return source
    raise DataSourceError(f"'data' needs source: one of {list_sources('source')} or format: one of "
                          f"{list_sources('format')}")


def _train_side(data: Mapping[str, Any]) -> dict[str, Any]:
    """A format's training data: ``data.train`` over ``data``, key by key."""
    train = data.get("train")
    if not isinstance(train, Mapping):
        raise DataSourceError(f"'data' names no training data: add data.train with the training split's locations "
                              f"(the keys of data: {sorted(_FORMAT_OPTIONS)})")
    return {**data, **train}


def open_examples(data: Mapping[str, Any], task: str, split: str = "val",
                  report: LoadReport | None = None) -> Examples:
    """Canonical examples of `task` from a spec's ``data:`` for `split`: "val" (what evaluation scores)
    or "train", which for a dataset format reads ``data.train`` over ``data`` (it may name another
    format). `report` counts a format's loaded and skipped rows."""
    if split not in SPLITS:
        raise DataSourceError(f"split must be one of {list(SPLITS)}, got {split!r}")
    source = source_of(data)
    if split == "train" and source.key == "format":
        data = _train_side(data)
        source = source_of(data)
    return source.open(data, task, split, report)
