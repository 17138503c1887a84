"""Lazy, sharded streams of canonical examples: OFA TSV files, canonical JSON Lines, WebDataset tar
shards and Hugging Face ``datasets`` (``streaming=True`` included), read record by record so that
nothing holds a whole data set.

A stream is split in two steps. Reading yields *raw* records (a TSV or JSON line, the files of one tar
sample, one dataset row): cheap, no image is decoded. Building (`Shard.example`) turns a record into a
validated canonical example, decoding its image; a consumer builds only the records it uses.

Each consumer (rank ``r`` of ``world`` processes, DataLoader worker ``i`` of ``n`` inside it) reads its
own share: consumer ``u = r * n + i`` of ``C = world * n``. With at least ``C`` shards it takes whole
shards (``order[u::C]``), otherwise every ``C``-th record of each shard; either way each record of an
epoch reaches exactly one consumer. The shard order is reshuffled every epoch from (seed, epoch).
A `Position` (epoch, shard, record) says where a consumer stands; a stream restarted at a position
continues with the exact record that came next.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from ofa_ufo.core.images import IMAGE_SUFFIXES, load_image
from ofa_ufo.data.canonical import DataError
from ofa_ufo.data.loaders._common import MAX_LOGGED_ERRORS, LoadReport, build_row, check_on_error, iter_lines
from ofa_ufo.data.loaders.hf_datasets import hf_row
from ofa_ufo.data.loaders.jsonl import JsonlRow, canonical_record
from ofa_ufo.data.loaders.tsv import TsvRow

__all__ = [
    "STREAM_SUFFIXES", "TASK_TSV_LAYOUTS", "Position", "RecordStream", "Shard", "StreamDataset", "consumer",
    "expand_braces", "find_shards", "log_skip", "hf_shard", "open_shards", "stream_examples",
]

logger = logging.getLogger("ofa_ufo.data.streaming")

STREAM_SUFFIXES = (".jsonl", ".tsv", ".tar")  # canonical JSON Lines, OFA TSV, WebDataset shard
# the OFA TSV layout (ofa_ufo.data.loaders.TSV_LAYOUTS) a task's .tsv files are read with, unless given
TASK_TSV_LAYOUTS = {"caption": "caption", "vqa": "vqa", "grounding": "refcoco", "entailment": "snli_ve",
                    "classification": "imagenet"}
# a WebDataset sample's image file: its key is the file suffix without the dot
SAMPLE_IMAGE_KEYS = tuple(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))


@dataclass(frozen=True)
class Position:
    """Where a consumer stands: `epoch`, `shard` (index into its shard list of that epoch) and `record`
    (raw records of that shard already passed, its own and the other consumers')."""

    epoch: int = 0
    shard: int = 0
    record: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# ---- shards: one file (or dataset) of raw records --------------------------------------------------

class Shard:
    """One shard: `records()` yields (1-based record number, raw record); `example(raw, row)` builds the
    validated canonical example (a DataError naming the shard, record and field when it cannot)."""

    def __init__(self, name: str, build: Callable[[Any, int], tuple[dict[str, Any], Any]]) -> None:
        self.name, self.build = name, build

    def records(self) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def example(self, raw: Any, row: int) -> dict[str, Any]:
        return build_row(self.build, raw, row, self.name)


class LineShard(Shard):
    """A text file of one record per line (JSON Lines, OFA TSV); blank lines are no record."""

    def records(self) -> Iterator[tuple[int, Any]]:
        return iter_lines(self.name)


class TarShard(Shard):
    """A WebDataset tar shard: consecutive files ``KEY.EXT`` form one sample (``KEY.json`` its canonical
    fields, ``KEY.jpg``/``.png``/... its image). A shard cut mid-record raises a DataError naming the shard
    and the record number."""

    def records(self) -> Iterator[tuple[int, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator  # optional dependency

        row = 0
        with open(self.name, "rb") as handle:
            files = ({**item, "__url__": self.name} for item in tar_file_iterator(handle))
            samples = group_by_keys(files)
            while True:
                try:
                    sample = next(samples)
                except StopIteration:
                    return
                except (tarfile.TarError, OSError, EOFError, ValueError) as error:
                    raise DataError(self.name, row + 1, "<tar>", f"unreadable tar data, the shard is truncated "
                                    f"or corrupt ({error})") from None
                row += 1
                yield row, sample


class TarSample:
    """Builds the canonical example of one WebDataset sample (picklable)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, sample: dict[str, Any], row: int) -> tuple[dict[str, Any], None]:
        if "json" not in sample:
            raise DataError(self.source, row, "json", f"sample {sample.get('__key__')!r} has no .json file "
                            f"(its files: {sorted(k for k in sample if not k.startswith('__'))})")
        try:
            record = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(self.source, row, "json", f"not valid JSON ({error})") from None
        if isinstance(record, dict):
            record.setdefault("id", sample["__key__"])
        example = canonical_record(record, self.source, row, Path(self.source).absolute().parent)
        image = next((sample[s] for s in SAMPLE_IMAGE_KEYS if s in sample), None)
        if image is not None:
            example["image"] = _image(image, self.source, row)
        return example, None


def _image(data: bytes, source: str, row: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return load_image(image)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DataError(source, row, "image", f"not a readable image ({error})") from None


class DatasetShard(Shard):
    """A Hugging Face ``datasets`` dataset (``Dataset``, or ``IterableDataset`` from ``streaming=True``)."""

    def __init__(self, name: str, build: Callable[[Any, int], tuple[dict[str, Any], Any]], dataset: Any) -> None:
        super().__init__(name, build)
        self.dataset = dataset

    def records(self) -> Iterator[tuple[int, Any]]:
        return enumerate(self.dataset, 1)


def hf_shard(dataset: Any, task: str, columns: dict[str, str], id_column: str | None = None,
             source: str | None = None) -> Shard:
    """A ``datasets`` dataset as one shard of canonical `task` examples, `columns` mapping canonical
    fields to its columns (as `ofa_ufo.data.loaders.load_hf_dataset`)."""
    build = hf_row(dataset, task, columns, id_column, source)
    return DatasetShard(build.source, build, dataset)


def expand_braces(text: str) -> list[str]:
    """``train-{000..002}.tar`` -> the three names (the ``braceexpand`` package, installed with webdataset)."""
    if "{" not in text:
        return [text]
    try:
        from braceexpand import braceexpand  # optional: the streaming extra
    except ImportError:
        raise DataError(text, None, "<path>", "a {a..b} shard range needs the braceexpand package: pip install "
                        "ofa_ufo[streaming]") from None
    return list(braceexpand(text))


def find_shards(data: str | os.PathLike) -> list[str]:
    """The shard files `data` names: a file, a folder (its ``.jsonl``/``.tsv``/``.tar`` files), a glob
    (``shards/*.tar``) or a brace range (``shards/train-{000..099}.tar``); sorted."""
    text = str(data)
    if Path(text).is_dir():
        names = [str(p) for p in Path(text).iterdir() if p.suffix in STREAM_SUFFIXES and p.is_file()]
        if not names:
            raise DataError(text, None, "<folder>", f"no usable data file: expected files ending in "
                            f"{list(STREAM_SUFFIXES)} (canonical JSON Lines, OFA TSV, WebDataset tar shards)")
        return sorted(names)
    names = sorted({name for pattern in expand_braces(text) for name in glob.glob(pattern)})
    if not names:
        raise DataError(text, None, "<path>", "no such file, folder or shard pattern")
    unusable = [name for name in names if Path(name).suffix not in STREAM_SUFFIXES]
    if unusable:
        raise DataError(unusable[0], None, "<path>", f"not a streamable file; expected one of {list(STREAM_SUFFIXES)}")
    return names


def open_shards(data: str | os.PathLike, task: str | None = None, layout: str | None = None,
                selected_cols: str | None = None) -> list[Shard]:
    """The shards of `data` (see `find_shards`), each with its format's record builder; ``.tsv`` files
    are read with `layout` (default: `task`'s entry in `TASK_TSV_LAYOUTS`)."""
    shards: list[Shard] = []
    for name in find_shards(data):
        suffix = Path(name).suffix
        if suffix == ".jsonl":
            shards.append(LineShard(name, JsonlRow(name)))
        elif suffix == ".tar":
            shards.append(TarShard(name, TarSample(name)))
        else:
            chosen = layout or TASK_TSV_LAYOUTS.get(task or "")
            if chosen is None:
                raise DataError(name, None, "layout", f"an OFA TSV file needs a layout for task {task!r}; "
                                f"give one of the layouts of ofa_ufo.data.loaders.TSV_LAYOUTS")
            shards.append(LineShard(name, TsvRow(chosen, selected_cols, name)))
    return shards


def log_skip(report: LoadReport, error: DataError, what: str) -> None:
    """Count a skipped record (or shard rest) in `report` and log it: the first few, then every 1000th,
    so a stream of bad records is never silent and never floods the log."""
    report.skip(error)
    if report.skipped <= MAX_LOGGED_ERRORS or report.skipped % 1000 == 0:
        logger.warning("skipped %s: %s (%d skipped so far in %s)", what, error, report.skipped, report.source)


# ---- consumers and the record stream ----------------------------------------------------------------

def consumer(rank: int = 0, world: int = 1, worker: int | None = None, workers: int | None = None) -> tuple[int, int]:
    """(consumer index, consumers) of rank `rank` of `world` and DataLoader worker `worker` of `workers`
    (default: the calling DataLoader worker's, or the one and only when not in a worker)."""
    if worker is None or workers is None:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if not (0 <= rank < world and 0 <= worker < workers):
        raise ValueError(f"rank {rank} of {world} and worker {worker} of {workers}: expected 0 <= rank < world "
                         "and 0 <= worker < workers")
    return rank * workers + worker, world * workers


class RecordStream:
    """The raw records consumer `index` of `count` reads from `shards`, epoch after epoch, each with
    its `Position`; `on_error="skip"` passes over the unreadable rest of a shard (counted in `report`
    and logged) instead of raising."""

    def __init__(self, shards: list[Shard], seed: int = 0, index: int = 0, count: int = 1,
                 on_error: str = "raise", report: LoadReport | None = None) -> None:
        check_on_error(on_error)
        if not shards:
            raise ValueError("a record stream needs at least one shard")
        self.shards, self.seed, self.index, self.count, self.on_error = shards, seed, index, count, on_error
        self.report = report if report is not None else LoadReport(source=shards[0].name)

    def shards_of(self, epoch: int) -> list[int]:
        """This consumer's shards (indices into `shards`) in epoch `epoch`'s order."""
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.shards)).tolist()
        return order[self.index::self.count] if len(self.shards) >= self.count else order

    def _stride(self) -> int:
        """1 when the consumer owns whole shards, else every `count`-th record of each shard is its own."""
        return 1 if len(self.shards) >= self.count else self.count

    def records(self, start: Position = Position(), epochs: int | None = None
                ) -> Iterator[tuple[Position, Shard, int, Any]]:
        """(position of the record, its shard, its record number, the raw record) from `start` on, for
        `epochs` epochs (None: without end); an epoch with no record for this consumer raises."""
        epoch, end = start.epoch, None if epochs is None else start.epoch + epochs
        while end is None or epoch < end:
            found = False
            for slot, shard_index in enumerate(self.shards_of(epoch)):
                if epoch == start.epoch and slot < start.shard:
                    continue
                first = start.record if (epoch, slot) == (start.epoch, start.shard) else 0
                for offset, row, raw in self._shard_records(self.shards[shard_index], first):
                    found = True
                    yield Position(epoch, slot, offset), self.shards[shard_index], row, raw
            if not found and start == Position(start.epoch):
                raise DataError(self.shards[0].name, None, "<stream>", f"consumer {self.index} of {self.count} "
                                f"found no record in an epoch of {len(self.shards)} shard(s)")
            epoch, start = epoch + 1, Position(epoch + 1)

    def _shard_records(self, shard: Shard, first: int) -> Iterator[tuple[int, int, Any]]:
        """(0-based offset, record number, raw record) of this consumer's records of `shard` from offset `first`."""
        stride, mine = self._stride(), self.index % self._stride()
        try:
            for offset, (row, raw) in enumerate(shard.records()):
                if offset >= first and offset % stride == mine:
                    yield offset, row, raw
        except DataError as error:
            if self.on_error == "raise":
                raise
            log_skip(self.report, error, f"the rest of shard {shard.name}")


def stream_examples(data: str | os.PathLike | list[Shard], task: str | None = None, *, rank: int = 0,
                    world: int = 1, worker: int | None = None, workers: int | None = None, seed: int = 0,
                    epochs: int | None = 1, on_error: str = "raise", report: LoadReport | None = None,
                    layout: str | None = None, selected_cols: str | None = None) -> Iterator[dict[str, Any]]:
    """Canonical examples of `data` (a path for `open_shards`, or shards) that this consumer reads (see
    `consumer`), built one by one; `task` keeps that task's examples only. A bad record raises a
    DataError naming its file and record, or with ``on_error="skip"`` is counted in `report` and logged."""
    shards = data if isinstance(data, list) else open_shards(data, task, layout, selected_cols)
    index, count = consumer(rank, world, worker, workers)
    report = report if report is not None else LoadReport(source=shards[0].name)
    stream = RecordStream(shards, seed, index, count, on_error, report)
    for _, shard, row, raw in stream.records(epochs=epochs):
        try:
            example = shard.example(raw, row)
        except DataError as error:
            if on_error == "raise":
                raise
            log_skip(report, error, "a record")
            continue
        if task is None or example["task"] == task:
            report.loaded += 1
            yield example


class StreamDataset(torch.utils.data.IterableDataset):
    """A stream for a ``torch.utils.data.DataLoader``: each worker of each rank
    reads its own share (`stream_examples` with the worker taken from the DataLoader)."""

    def __init__(self, data: str | os.PathLike, task: str | None = None, rank: int = 0, world: int = 1,
                 **options: Any) -> None:
        super().__init__()
        self.data, self.task, self.rank, self.world, self.options = data, task, rank, world, options

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return stream_examples(self.data, self.task, rank=self.rank, world=self.world, **self.options)
