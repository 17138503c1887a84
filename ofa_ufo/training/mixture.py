"""The task mixture: per-task example sources, fixed per-step task quotas, batch building.

Every optimizer step holds every enabled task: the global micro-batch is split into per-task
quotas by the configured ratios (largest remainder, at least one sample per task). A task's
k-th draw is a pure function of (seed, task, k), so the data position after step s is known
from s alone: resuming at a step reproduces the exact batches, and every process of a
distributed run builds the same global batch and keeps its own slice.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ofa_ufo.data import DemoScenes, make_examples
from ofa_ufo.data.demo_identities import DemoIdentities
from ofa_ufo.data.canonical import DataError
from ofa_ufo.data.loaders import LoadReport
from ofa_ufo.data.sources import DataSourceError, expand_env, open_examples, stream_shards
from ofa_ufo.data.streaming import Position, RecordStream, Shard, log_skip, open_shards
from ofa_ufo.data.specs import TaskSpec, list_specs, load_spec
from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.tasks import get_task
from ofa_ufo.training.config import ConfigError, TrainConfig

DEMO = "demo"


def task_quotas(ratios: dict[str, float], batch_size: int) -> dict[str, int]:
    """Samples per task in a micro-batch of `batch_size`: proportional to `ratios` by largest
    remainder, every task at least one."""
    total = sum(ratios.values())
    spare = batch_size - len(ratios)
    exact = {task: spare * ratio / total for task, ratio in ratios.items()}
    quotas = {task: 1 + math.floor(value) for task, value in exact.items()}
    leftover = batch_size - sum(quotas.values())
    for task in sorted(exact, key=lambda t: (math.floor(exact[t]) - exact[t], t))[:leftover]:
        quotas[task] += 1
    return quotas


class DemoSource:
    """Generated demo scenes for one task; draw k is scene perm[k mod n] with epoch k // n's questions,
    built with `options` (keyword arguments of the task's demo example builder)."""

    def __init__(self, task: str, scenes: DemoScenes, seed: int, options: dict[str, Any] | None = None) -> None:
        self.task, self.scenes, self.seed, self.options = task, scenes, seed, options or {}

    def __len__(self) -> int:
        return len(self.scenes)

    def draw(self, k: int) -> dict[str, Any]:
        epoch, pos = divmod(k, len(self.scenes))
        index = int(_permutation(self.seed, self.task, epoch, len(self.scenes))[pos])
        rng = self.scenes.example_rng(index, epoch)
        (example,) = make_examples(self.scenes[index], rng, (self.task,), {self.task: self.options})
        return {**example, "id": f"demo-{index}"}


class ListSource:
    """Examples loaded from a dataset (canonical dicts); draw k walks a fresh permutation per epoch."""

    def __init__(self, task: str, examples: list[dict[str, Any]], seed: int, name: str) -> None:
        if not examples:
            raise DataSourceError(f"{name}: the training data for task {task!r} is empty")
        self.task, self.examples, self.seed = task, examples, seed

    def __len__(self) -> int:
        return len(self.examples)

    def draw(self, k: int) -> dict[str, Any]:
        epoch, pos = divmod(k, len(self.examples))
        return self.examples[int(_permutation(self.seed, self.task, epoch, len(self.examples))[pos])]


class StreamSource:
    """A task's examples read lazily from shards (`ofa_ufo.data.streaming`): this process's share of
    them, epoch after epoch. Draw j is the j-th record of the share, built (image decoded) only when
    drawn; records between draws are passed over unbuilt. A record that cannot be built (with
    ``on_error: skip``: counted and logged) or that holds another task is stood in for by the next
    usable record, so draw j stays a function of j alone. `position(j)` / `restore(state)` carry where
    the stream stands across a checkpoint."""

    LOOKAHEAD = 10_000  # records searched for a usable one before the data are declared unusable

    def __init__(self, task: str, shards: list[Shard], seed: int, rank: int = 0, world: int = 1,
                 on_error: str = "raise", name: str = "") -> None:
        self.task, self.name, self.on_error = task, name or shards[0].name, on_error
        self.report = LoadReport(source=self.name)
        self.stream = RecordStream(shards, seed, rank, world, on_error, self.report)
        self._anchor: tuple[int, Position] = (0, Position())  # (draw, position) reading restarts from
        self._reset(*self._anchor)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for DataLoader workers: the open reader stays behind, the new process reopens it."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_records", "_ahead")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset(*self._anchor)

    def _reset(self, draws: int, position: Position) -> None:
        self._next, self._pid = draws, os.getpid()
        self._records = self.stream.records(position, epochs=None)
        self._ahead: deque = deque()  # records read past the cursor (stand-ins, a peeked position)

    def _seek(self, draw: int) -> None:
        """Make `draw` the next record: restart from the anchor (or the start) when behind or in a new process."""
        if draw < self._next or os.getpid() != self._pid:
            self._reset(*(self._anchor if self._anchor[0] <= draw else (0, Position())))
        while self._next < draw:
            self._pop()

    def _pop(self) -> tuple:
        self._next += 1
        return self._ahead.popleft() if self._ahead else next(self._records)

    def _peek(self, i: int) -> tuple:
        while len(self._ahead) <= i:
            self._ahead.append(next(self._records))
        return self._ahead[i]

    def draw(self, k: int) -> dict[str, Any]:
        self._seek(k)
        example = self._build(self._pop())
        for i in range(self.LOOKAHEAD):
            if example is not None:
                return example
            example = self._build(self._peek(i))
        raise DataSourceError(f"{self.name}: no usable {self.task!r} example in {self.LOOKAHEAD} records after "
                              f"draw {k} (another task's data, or every record bad)")

    def _build(self, record: tuple) -> dict[str, Any] | None:
        """The example of a record, or None where it cannot be built (on_error: skip) or is another task's."""
        _, shard, row, raw = record
        try:
            example = shard.example(raw, row)
        except DataError as error:
            if self.on_error == "raise":
                raise
            log_skip(self.report, error, f"a {self.task!r} record")
            return None
        return example if example["task"] == self.task else None

    def position(self, draw: int) -> dict[str, int]:
        """Where the stream stands before draw `draw`: {draws, epoch, shard, record} (the checkpoint's)."""
        self._seek(draw)
        position = self._peek(0)[0]
        self._anchor = (draw, position)
        return {"draws": draw, **position.as_dict()}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a saved `position`: the next record read is the one that came next then."""
        self._anchor = (int(state["draws"]), Position(int(state["epoch"]), int(state["shard"]), int(state["record"])))
        self._reset(*self._anchor)


@functools.lru_cache(maxsize=64)
def _permutation(seed: int, task: str, epoch: int, size: int) -> np.ndarray:
    """The order of a task's examples in `epoch`; kept (read-only), as every draw of the epoch reads it."""
    key = np.random.SeedSequence((seed, zlib.crc32(task.encode()), epoch))
    order = np.random.default_rng(key).permutation(size)
    order.flags.writeable = False
    return order


def _spec_source(task: str, spec_name: str, seed: int, rank: int = 0, world: int = 1) -> ListSource | StreamSource:
    """The training side of a spec's data (`data.train`, see `ofa_ufo.data.sources.open_examples`); read
    lazily when it says ``streaming: true`` (`ofa_ufo.data.sources.stream_shards`)."""
    spec = load_spec(spec_name)
    if spec.task != task:
        raise ConfigError(f"data for task {task!r} names spec {spec.name!r}, which is a {spec.task!r} spec")
    train = spec.data.get("train")
    options = {**spec.data, **(train if isinstance(train, dict) else {})}
    try:
        shards = stream_shards(spec.data, task)
        if shards is not None:
            return StreamSource(task, shards, seed, rank, world, options.get("on_error", "skip"), f"spec {spec.name!r}")
        examples = list(open_examples(spec.data, task, split="train"))
    except (FileNotFoundError, OSError, ValueError) as error:
        where = ", ".join(f"{k}: {v}" for k, v in options.items() if k not in ("format", "train"))
        raise DataSourceError(
            f"spec {spec.name!r}: cannot read its training data ({error}). Expected format "
            f"{options.get('format')!r} with {where} (spec data.train); see docs/data.md and docs/finetuning.md"
        ) from None
    return ListSource(task, examples, seed, f"spec {spec.name!r}")


def _jsonl_examples(path: str, task: str) -> Iterator[dict[str, Any]]:
    """The rows of `task` in a canonical `.jsonl` file, read as a spec's `data: {format: jsonl}` is."""
    data = {"format": "jsonl", "input": path, "on_error": "raise"}
    return (example for example in open_examples(data, task) if example["task"] == task)


def _jsonl_source(task: str, path: str, seed: int) -> ListSource:
    """A canonical `.jsonl` file (docs/data.md); only its rows of `task` are used."""
    try:
        path = expand_env(path)
    except DataSourceError as error:
        raise DataSourceError(f"task {task!r}: {error}") from None
    if not Path(path).is_file():
        raise DataSourceError(f"training data file {path} for task {task!r} does not exist; expected canonical "
                              "JSON Lines (one example per line, see docs/data.md)")
    return ListSource(task, list(_jsonl_examples(path, task)), seed, str(path))


PRETRAIN_DATA = "OFA_PRETRAIN_DATA"  # a pretraining corpus (run_scripts/pretrain_ofa_*.sh): always streamed


def _is_stream_path(data: str, streaming: bool) -> bool:
    """`data` names files to stream: a .tsv/.tar file, a folder or a shard pattern, or a .jsonl file with
    `streaming` or under $OFA_PRETRAIN_DATA."""
    if data.endswith((".tsv", ".tar")) or any(char in data.replace("${", "") for char in "*?[{") or data.endswith("/"):
        return True
    if data.endswith(".jsonl"):
        return streaming or PRETRAIN_DATA in data
    return "/" in data and Path(expand_env(data)).is_dir()


def _stream_source(task: str, data: str, config: TrainConfig, rank: int, world: int) -> StreamSource:
    """Files, a folder or shards of `task`'s data read lazily (`ofa_ufo.data.streaming`), this process's share."""
    try:
        path = expand_env(data)
        shards = open_shards(path, task)
    except (DataSourceError, DataError) as error:
        raise DataSourceError(f"training data of task {task!r}: {error}; expected canonical JSON Lines, OFA TSV "
                              "files or WebDataset tar shards (docs/data.md, streaming)") from None
    if getattr(get_task(task), "instances_per_identity", 0):
        raise DataSourceError(f"task {task!r} draws P x K identity chunks, which need its whole identity list: give "
                              "it a .jsonl file with streaming: false (docs/retrieval.md)")
    return StreamSource(task, shards, config.seed, rank, world, config.stream_on_error, path)


def _demo_scenes(task: str, config: TrainConfig, scenes: DemoScenes) -> DemoSource:
    """The run's generated scenes, drawn in this task's own order."""
    if len(scenes) == 0:
        raise DataSourceError("demo_train_scenes is 0: the demo training set is empty")
    return DemoSource(task, scenes, config.seed, config.demo_options.get(task))


def _demo_identities(task: str, config: TrainConfig, scenes: DemoScenes) -> ListSource:
    """Generated identities of this task's kind (`demo_train_identities` of them)."""
    try:
        identities = DemoIdentities(task, "train", config.demo_train_identities, seed=config.seed)
    except ValueError as error:  # a task without generated identities
        raise DataSourceError(str(error)) from None
    return ListSource(task, identities, config.seed, "demo_train_identities")


DEMO_SOURCES = {"scenes": _demo_scenes, "identities": _demo_identities}  # by `Task.demo_data`


def build_sources(config: TrainConfig, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """One example source per configured task: `data[task]` is "demo" (default: the generated data the
    task draws, `Task.demo_data`), a spec name or spec file from tasks/, a canonical `.jsonl` file, or
    files streamed lazily (a .tsv/.tar file, a folder, a shard pattern, a .jsonl with `streaming`; rank
    `rank` of `world` reads its share); each passed through its task's `training_source` (e.g. P x K
    draws, caption dropout)."""
    scenes = DemoScenes("train", config.demo_train_scenes, seed=config.seed, max_objects=config.demo_max_objects,
                        object_size=config.demo_object_size)
    sources: dict[str, Any] = {}
    for name in config.tasks:
        task = get_task(name)  # unknown task names fail here, listing the registered ones
        data = config.data.get(name, DEMO)
        if data == DEMO:
            source = DEMO_SOURCES[task.demo_data](name, config, scenes)
        elif _is_stream_path(data, config.streaming):
            source = _stream_source(name, data, config, rank, world)
        elif data.endswith(".jsonl"):
            source = _jsonl_source(name, data, config.seed)
        else:
            source = _spec_source(name, data, config.seed, rank, world)
        options = {option: getattr(config, option) for option in task.source_options}
        try:
            sources[name] = task.training_source(source, config.seed, options)
        except ValueError as error:
            raise DataSourceError(str(error)) from None
    return sources


def check_identity_quotas(sources: dict[str, Any], quotas: dict[str, int]) -> None:
    """A P x K source needs a per-step quota of whole identity chunks (a multiple of K)."""
    for task, source in sources.items():
        k = getattr(source, "k", 1)
        if quotas[task] % k:
            raise ConfigError(f"task {task!r} draws identities in chunks of K={k} but gets {quotas[task]} samples "
                              "per micro-batch; choose batch_size and task ratios that give it a multiple of K")


def eval_examples(config: TrainConfig, task: str) -> tuple[list[dict[str, Any]], Any]:
    """Held-out examples of a task (`eval_data[task]`, else the validation side of `data[task]`)
    and the spec that says how to decode and score them; ([], None) when there are none."""
    data = config.eval_data.get(task) or config.data.get(task, DEMO)
    try:
        return _held_out(config, task, data)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise DataSourceError(f"held-out data for task {task!r} ({data}) cannot be read ({error}); fix the path, "
                              f"set eval_data={{{task}: FILE.jsonl}}, or eval_examples=0") from None


def _held_out(config: TrainConfig, task: str, data: str) -> tuple[list[dict[str, Any]], Any]:
    """The validation side of `data` (a `.jsonl` file only when given as eval_data; "demo": the task's
    `demo_<task>` spec sized by the run's demo settings; a spec) and the spec that scores it."""
    if data.endswith(".jsonl"):
        if task not in config.eval_data:
            return [], None  # a training file has no held-out side
        examples = list(islice(_jsonl_examples(data, task), config.eval_examples))
        return examples, TaskSpec(name=data, task=task, data={}, metric=get_task(task).metric)
    if data == DEMO:
        name = f"demo_{task}"
        if name not in list_specs():
            return [], None
        spec = load_spec(name)
        # each generated source reads the settings it has (scenes: val_scenes..., identities: val_examples)
        size = {"val_scenes": config.eval_examples, "val_examples": config.eval_examples,
                "max_objects": config.demo_max_objects, "object_size": list(config.demo_object_size),
                "task_options": config.demo_options.get(task)}
        spec = replace(spec, data={**spec.data, **size})
    else:
        spec = load_spec(data)
    return list(islice(open_examples(spec.data, spec.task, split="val"), config.eval_examples)), spec


def _base(source: Any) -> Any:
    """The source under a task's wrappers (e.g. `CaptionDropout`)."""
    while hasattr(source, "source"):
        source = source.source
    return source


@dataclass
class Mixture:
    """Per-step global batches of the configured mixture; position = number of steps taken. A streamed
    task's slots hold examples of this process (rank `rank` of `world`) only: it reads its own share of the
    stream, draw j of it being its j-th slot of the task; the other processes' slots are None (each process
    keeps `micro_batch(...)[rank::world]`)."""

    sources: dict[str, DemoSource | ListSource | StreamSource]
    quotas: dict[str, int]
    rank: int = 0
    world: int = 1

    def micro_batch(self, step: int, micro: int, grad_accum: int) -> list[dict[str, Any] | None]:
        """Examples of micro-batch `micro` of optimizer step `step` (same on every process, but for
        streamed tasks: this process's slots)."""
        examples: list[dict[str, Any] | None] = []
        for task, quota in self.quotas.items():
            if task in self.streamed:
                slots = [(len(examples) + i) % self.world == self.rank for i in range(quota)]
                first = (step * grad_accum + micro) * sum(slots)
                draws = iter(range(first, first + sum(slots)))
                examples += [self.sources[task].draw(next(draws)) if mine else None for mine in slots]
            else:
                first = (step * grad_accum + micro) * quota
                examples += [self.sources[task].draw(k) for k in range(first, first + quota)]
        return examples

    @property
    def streamed(self) -> list[str]:
        return [task for task, source in self.sources.items() if isinstance(_base(source), StreamSource)]

    def _draws_before(self, task: str, step: int, grad_accum: int) -> int:
        """Draws of streamed `task` this process made before optimizer step `step`."""
        tasks = list(self.quotas)
        offset = sum(self.quotas[t] for t in tasks[: tasks.index(task)])  # the task's first slot
        mine = sum((offset + i) % self.world == self.rank for i in range(self.quotas[task]))
        return step * grad_accum * mine

    def stream_state(self, step: int, grad_accum: int) -> dict[str, dict[str, int]]:
        """Where each streamed task's stream stands before step `step`: {task: {draws, epoch, shard, record}}."""
        return {task: _base(self.sources[task]).position(self._draws_before(task, step, grad_accum))
                for task in self.streamed}

    def restore_streams(self, state: dict[str, dict[str, int]], step: int, grad_accum: int) -> None:
        """Continue each streamed task from its saved position (checked against `step`)."""
        for task in self.streamed:
            saved, draws = state.get(task), self._draws_before(task, step, grad_accum)
            if saved is None or int(saved["draws"]) != draws:
                raise DataSourceError(f"the checkpoint holds no stream position of task {task!r} at step {step} "
                                      f"(expected {draws} draws, saved {saved}); it was written by another data setup")
            _base(self.sources[task]).restore(saved)


def build_batch(processor, examples: Sequence[dict[str, Any]], config: OFAUFOConfig, style: str = "ofa",
                vqgan=None) -> dict[str, torch.Tensor]:
    """Examples of any tasks -> one padded batch (prompts and targets from each task's builder);
    a task without a token target (target None, e.g. embedding tasks) gets an all-ignored label row.
    `config` is the model's: each row's `task_ids` entry is its route in that model's task vocabulary.

    Image-generation tasks (text_to_image, image_infill) need `vqgan` (a `VQGANModel`) to encode their
    targets; their rows are marked in `code_grid` (B,) (0 for text rows), which the model takes."""
    size = processor.image_processor.size
    prompts, targets, sides = [], [], []
    tasks = [get_task(example["task"]) for example in examples]
    for example, task in zip(examples, tasks):
        image = example["image"]
        meta = dict(original_size=image.size if image is not None else (size, size), input_size=(size, size),
                    box_codec=processor.box_codec, vqgan=vqgan)
        prompt, target = task.build_example(example, meta, style)
        prompts.append(prompt)
        targets.append(target)
        sides.append(task.code_grid_side(meta))
    texts = ["" if target is None else target for target in targets]
    limit = max(processor.tokenizer.model_max_length, max(sides) ** 2 + 1)  # a full code grid + </s> is kept
    batch = processor(images=[task.encoder_image(e) for e, task in zip(examples, tasks)], text=prompts,
                      text_target=texts, return_tensors="pt", max_length=limit)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask", "labels")}
    for i, task in enumerate(tasks):
        inputs["pixel_values"][i] = task.prepare_pixels(inputs["pixel_values"][i : i + 1])[0]  # (3, S, S)
    if any(sides):
        inputs["code_grid"] = torch.tensor(sides)
    inputs["labels"][torch.tensor([target is None for target in targets])] = -100  # (B, T) rows
    inputs["task_ids"] = torch.tensor([config.vision_config.route_id(e["task"]) for e in examples])  # (B,) routes
    return inputs
