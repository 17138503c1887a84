"""Data sources: every way to get canonical examples, by name, with typed options.

One registry, :data:`SOURCES`, holds the dataset formats read from disk (a spec's
``data: {format: coco_captions, input: ..., images: ...}``, or ``python -m ofa_ufo.data.convert
--format coco_captions --input ... --images ...``) and the generated demo sources
(``data: {source: demo_scenes}``). :func:`open_examples` opens a spec's ``data:`` mapping for the
``train`` or ``val`` split; evaluation, training and the convert command all read data through this
module. Paths in a spec may use environment variables (``${COCO_ROOT}``). :func:`decoding_options`
gives what a spec's data add to decoding: the closed answer set of ``answers:`` (VQA v2's 3,129).

A source that cannot be opened raises :class:`DataSourceError` (a ``ValueError``) naming the format
or source, the option or file at fault and the form expected; bad rows raise the loaders'
``DataError``. The commands turn both into exit codes.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ofa_ufo.data.canonical import IDENTITY_TASKS
from ofa_ufo.data.demo_examples import make_examples
from ofa_ufo.data.demo_identities import DemoIdentities, held_out_examples
from ofa_ufo.data.demo_scenes import DEFAULT_OBJECT_SIZE, DemoScenes
from ofa_ufo.data.loaders import (
    KARPATHY_UNITS, TSV_LAYOUTS, LoadReport, build_answer_vocabulary, karpathy_splits, load_coco_captions,
    load_coco_instances, load_coco_karpathy, load_hf_dataset, load_identity_folder, load_image_folder, load_jsonl,
    load_lfw_pairs, load_market1501, load_msmt17, load_ofa_tsv, load_refcoco, load_snli_ve, load_sop, load_veri776,
    load_vqa_v2, read_answer_vocabulary,
)
from ofa_ufo.data.loaders.reid import LFW_IMAGE_PATTERN, REID_SPLITS
from ofa_ufo.data.streaming import Shard, expand_braces, hf_shard, open_shards, stream_examples

__all__ = [
    "SOURCES", "SPLITS", "DataSourceError", "DemoIdentitiesOptions", "DemoScenesOptions", "Format", "FormatOptions",
    "Generated", "MissingOptionError", "answer_vocabulary", "decoding_options", "expand_env", "list_sources",
    "open_examples", "source_of", "stream_shards",
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
    # refcoco: one split; coco_karpathy and ReID roots: some splits (train,restval / query,gallery); sop: the meta split
    split: str | None = None
    per: str | None = None  # coco_karpathy: one example per "image" (default) or per "caption"
    answers: str | None = None  # closed answer set for decoding: top<N> (vqa_v2 training answers) or a vocabulary file
    image_pattern: str | None = None  # vqa_v2, lfw_pairs: image file name pattern
    task: str | None = None  # hf: the canonical task; identity_folder: the embedding task
    columns: str | None = None  # hf: field=column pairs, e.g. image=img,text=question,target=answer
    id_column: str | None = None  # hf: the column holding the example id
    on_error: str = "raise"  # "raise" at the first bad row, or "skip" bad rows (counted, logged once)
    # the trainer reads the data lazily, record by record, each process its own share (jsonl, ofa_tsv,
    # webdataset, hf; ofa_ufo.data.streaming) instead of loading the whole split first
    streaming: bool = False


@dataclass(frozen=True)
class DemoScenesOptions:
    """``data: {source: demo_scenes}``: generated shape scenes (`ofa_ufo.data.demo_scenes`), one example
    of the spec's task per scene; either split holds `val_scenes` scenes."""

    val_scenes: int = 200
    size: int = 256
    seed: int = 0
    max_objects: int = 3
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE
    # keyword arguments of the task's example builder (ofa_ufo.data.demo_examples), e.g. grounding's
    # {multi_prob: 0.3, none_prob: 0.2}
    task_options: dict[str, Any] = field(default_factory=dict)


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
            if option in self.needs and not _present(getattr(options, option)):
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


def _present(path: str) -> bool:
    """A file or folder, or a shard pattern (``train-{000..009}.tar``, ``*.tsv``) that matches some."""
    return Path(path).exists() or any(glob.glob(name) for name in expand_braces(path))


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
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif isinstance(default, tuple):
        numbers = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if numbers and len(value) == len(default):
            return tuple(float(v) for v in value)
        expected = f"a list of {len(default)} numbers"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif isinstance(default, dict):
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
        expected = "a mapping of names to values"
    elif isinstance(value, str):
        return value
    else:
        expected = "a string"
    raise DataSourceError(f"{what} must be {expected}, got {value!r}")


def _typed(cls: type[_Options], values: Mapping[str, Any], where: str) -> _Options:
    """Dataclass `cls` from those keys of `values` that are its fields (None: the default), type-checked."""
    defaults = {option.name: option.default_factory() if option.default is MISSING else option.default
                for option in fields(cls)}
    chosen = {option.name: _checked(values[option.name], defaults[option.name], f"{where} option {option.name!r}")
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


_HF_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _hf_stream(options: FormatOptions) -> list[Shard]:
    """A ``datasets`` source read lazily: a save_to_disk folder as an iterable dataset, or local files
    through ``load_dataset(..., streaming=True)``."""
    import datasets  # heavy (pyarrow), needed only for a datasets source

    path = Path(options.input)
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path)).to_iterable_dataset()
    elif path.suffix in _HF_BUILDERS:
        dataset = datasets.load_dataset(_HF_BUILDERS[path.suffix], data_files=str(path), split="train", streaming=True)
    else:
        raise DataSourceError(f"format 'hf' reads a save_to_disk folder or one of {sorted(_HF_BUILDERS)}, "
                              f"got input {path}")
    return [hf_shard(dataset, options.task, _columns(options.columns), options.id_column, str(path))]


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


def _karpathy(options: FormatOptions, report: LoadReport) -> Examples:
    """Karpathy's dataset_coco.json: `split` (default test), one example per image unless `per: caption`."""
    per = options.per or "image"
    try:
        splits = karpathy_splits(options.split or "test")
    except ValueError as error:
        raise DataSourceError(f"format 'coco_karpathy' option 'split': {error}") from None
    if per not in KARPATHY_UNITS:
        raise DataSourceError(f"format 'coco_karpathy' option 'per' must be one of {list(KARPATHY_UNITS)}, got {per!r}")
    return load_coco_karpathy(options.input, options.images, splits, per, options.on_error, report)


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
            options = {task: settings.task_options}
            (example,) = make_examples(scenes[index], scenes.example_rng(index), (task,), options)
        except KeyError as error:  # a task scenes make no examples of
            raise DataSourceError(f"source 'demo_scenes': {error.args[0]}") from None
        except (TypeError, ValueError) as error:  # task_options its builder does not take
            raise DataSourceError(f"source 'demo_scenes' option 'task_options' for task {task!r}: {error}") from None
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
    Format("webdataset", lambda o, report: stream_examples(o.input, o.task, on_error=o.on_error, report=report),
           {"input": "a WebDataset .tar shard, a folder of them or a pattern (train-{000..099}.tar); each sample "
                     "KEY.json (canonical fields) + KEY.jpg/.png (its image)"}),
    Format("coco_captions", _with_images(load_coco_captions),
           {"input": "a COCO captions_*.json file", "images": _IMAGES}),
    Format("coco_instances", _with_images(load_coco_instances),
           {"input": "a COCO instances_*.json file", "images": _IMAGES}),
    Format("coco_karpathy", _karpathy,
           {"input": "Karpathy's dataset_coco.json", "images": "the COCO root folder (holding train2014/, val2014/)"}),
    Format("vqa_v2", lambda o, report: load_vqa_v2(o.input, o.annotations, o.images, o.image_pattern, o.on_error,
                                                   report),
           {"input": "a VQA v2 questions .json file", "annotations": "the VQA v2 annotations .json file",
            "images": _IMAGES}),
    Format("refcoco", lambda o, report: load_refcoco(o.input, o.annotations, o.images, o.split, o.on_error, report),
           {"input": "a RefCOCO refs file as distributed, refs(unc).p or refs(umd).p (or its .json export)",
            "annotations": "its COCO instances.json file", "images": _IMAGES}),
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


# ---- closed answer sets -------------------------------------------------------------------------

_TOP = re.compile(r"top(\d+)")
_ANSWERS_FORM = "top<N> (the N most frequent training answers, e.g. top3129) or an answer vocabulary file"


@lru_cache(maxsize=4)
def _counted_vocabulary(path: str, modified_ns: int, size: int) -> tuple[str, ...]:
    """`build_answer_vocabulary`, kept while the file is unchanged (evaluation during training asks each time)."""
    return tuple(build_answer_vocabulary(path, size))


def _top_answers(data: Mapping[str, Any], size: int, where: str) -> list[str]:
    """The `size` most frequent answers of the training annotations (``data.train`` over ``data``)."""
    side = {**data, **data["train"]} if isinstance(data.get("train"), Mapping) else data
    if side.get("format") != "vqa_v2":
        raise DataSourceError(f"{where} option 'answers': top{size} counts the answers of VQA v2 training "
                              f"annotations (format 'vqa_v2'); give another format an answer vocabulary file")
    if side.get("annotations") is None:
        raise DataSourceError(f"{where} option 'answers': top{size} needs the training annotations "
                              f"(data.train.annotations, the VQA v2 train annotations .json file)")
    path = expand_env(side["annotations"])
    if not Path(path).is_file():
        raise DataSourceError(f"{where} option 'answers': the training annotations {path} do not exist; "
                              f"expected the VQA v2 train annotations .json file")
    return list(_counted_vocabulary(path, os.stat(path).st_mtime_ns, size))


def answer_vocabulary(data: Mapping[str, Any]) -> list[str] | None:
    """The closed answer set a spec's ``data: {answers: ...}`` names, or None where it names none.

    ``top<N>``: the N most frequent normalised answers of the training annotations (``data.train``'s
    ``annotations`` over ``data``'s; format vqa_v2), built on the fly (`build_answer_vocabulary`);
    any other value: a vocabulary file (`read_answer_vocabulary`: a JSON list, or an ``{answer:
    label}`` mapping such as OFA's trainval_ans2label.pkl)."""
    value = data.get("answers") if isinstance(data, Mapping) else None
    if value is None:
        return None
    where = f"format {data.get('format')!r}" if data.get("format") else "'data'"
    if not isinstance(value, str) or not value.strip():
        raise DataSourceError(f"{where} option 'answers' must be {_ANSWERS_FORM}, got {value!r}")
    value = expand_env(value).strip()
    top = _TOP.fullmatch(value)
    if top is not None:
        if int(top.group(1)) < 1:
            raise DataSourceError(f"{where} option 'answers' must be {_ANSWERS_FORM}, got {value!r}")
        return _top_answers(data, int(top.group(1)), where)
    if not Path(value).is_file():
        raise DataSourceError(f"{where} option 'answers': {value} does not exist; expected {_ANSWERS_FORM}")
    return read_answer_vocabulary(value)


def decoding_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a spec's data add to its pipeline calls: the ``answers:`` vocabulary as the task's
    ``candidates``, so answers are decoded through the trie over it (`ofa_ufo.tasks.choice`)."""
    answers = answer_vocabulary(data)
    return {} if answers is None else {"candidates": answers}


# ---- streamed training data ---------------------------------------------------------------------

_STREAMED = ("jsonl", "ofa_tsv", "webdataset", "hf")


def stream_shards(data: Mapping[str, Any], task: str) -> list[Shard] | None:
    """The shards of a spec's training data when it says ``streaming: true`` (`ofa_ufo.data.streaming`:
    read lazily, each process its share); None when it does not."""
    side = _train_side(data) if source_of(data).key == "format" else data
    if not side.get("streaming"):
        return None
    source = source_of(side)
    if source.name not in _STREAMED:
        raise DataSourceError(f"format {source.name!r} cannot be streamed (streaming: true); streamed formats are "
                              f"{list(_STREAMED)}")
    values = {key: expand_env(value) for key, value in side.items() if key in _FORMAT_OPTIONS}
    options = source.options(values)
    if options.input is None or not _present(options.input):
        raise DataSourceError(f"format {source.name!r}: input {options.input} does not exist; expected "
                              f"{source.needs['input']}")
    if source.name == "hf":
        return _hf_stream(options)
    return open_shards(options.input, task, options.layout, options.selected_cols)
