"""The task mixture: per-task example sources, fixed per-step task quotas, batch building.

Every optimizer step holds every enabled task: the global micro-batch is split into per-task
quotas by the configured ratios (largest remainder, at least one sample per task). A task's
k-th draw is a pure function of (seed, task, k), so the data position after step s is known
from s alone: resuming at a step reproduces the exact batches, and every process of a
distributed run builds the same global batch and keeps its own slice.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ofa_ufo.data import DemoScenes, make_examples
from ofa_ufo.data.demo_identities import IDENTITY_TASKS, DemoIdentities
from ofa_ufo.tasks import get_task, task_id
from ofa_ufo.training.config import ConfigError, TrainConfig

DEMO = "demo"


class DataSourceError(ValueError):
    """Training data that cannot be found or read; the message names the expected location and format."""


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
    """Generated demo scenes for one task; draw k is scene perm[k mod n] with epoch k // n's questions."""

    def __init__(self, task: str, scenes: DemoScenes, seed: int) -> None:
        self.task, self.scenes, self.seed = task, scenes, seed

    def __len__(self) -> int:
        return len(self.scenes)

    def draw(self, k: int) -> dict[str, Any]:
        epoch, pos = divmod(k, len(self.scenes))
        index = int(_permutation(self.seed, self.task, epoch, len(self.scenes))[pos])
        (example,) = make_examples(self.scenes[index], self.scenes.example_rng(index, epoch), (self.task,))
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


class CaptionDropout:
    """Draw k of `source` with its caption replaced by "" (text_to_image's unconditional prompt) for a
    fixed `rate` of the draws, chosen by (seed, k) so that a resumed run drops the same ones."""

    def __init__(self, source, rate: float, seed: int) -> None:
        self.source, self.rate, self.seed = source, rate, seed
        self.task = source.task

    def __len__(self) -> int:
        return len(self.source)

    def draw(self, k: int) -> dict[str, Any]:
        example = self.source.draw(k)
        if np.random.default_rng((self.seed, zlib.crc32(b"caption_dropout"), k)).random() < self.rate:
            return {**example, "text": ""}
        return example


def _permutation(seed: int, task: str, epoch: int, size: int) -> np.ndarray:
    key = np.random.SeedSequence((seed, zlib.crc32(task.encode()), epoch))
    return np.random.default_rng(key).permutation(size)


def _spec_source(task: str, spec_name: str, seed: int) -> ListSource:
    from ofa_ufo.evaluate import open_examples
    from ofa_ufo.data.specs import load_spec

    spec = load_spec(spec_name)
    if spec.task != task:
        raise ConfigError(f"data for task {task!r} names spec {spec.name!r}, which is a {spec.task!r} spec")
    try:
        examples = list(open_examples(spec, split="train"))
    except (FileNotFoundError, OSError, ValueError) as error:
        train = spec.data.get("train")
        options = {**spec.data, **(train if isinstance(train, dict) else {})}
        where = ", ".join(f"{k}: {v}" for k, v in options.items() if k not in ("format", "train"))
        raise DataSourceError(
            f"spec {spec.name!r}: cannot read its training data ({error}). Expected format "
            f"{options.get('format')!r} with {where} (spec data.train); see docs/data.md and docs/finetuning.md"
        ) from None
    return ListSource(task, examples, seed, f"spec {spec.name!r}")


def _jsonl_source(task: str, path: str, seed: int) -> ListSource:
    """A canonical `.jsonl` file (docs/data.md); only its rows of `task` are used."""
    from ofa_ufo.data.loaders.jsonl import load_jsonl
    from ofa_ufo.evaluate import expand_env

    try:
        path = expand_env(path)
    except ValueError as error:
        raise DataSourceError(f"task {task!r}: {error}") from None
    if not Path(path).is_file():
        raise DataSourceError(f"training data file {path} for task {task!r} does not exist; expected canonical "
                              "JSON Lines (one example per line, see docs/data.md)")
    examples = [e for e in load_jsonl(path) if e["task"] == task]
    return ListSource(task, examples, seed, str(path))


def build_sources(config: TrainConfig) -> dict[str, DemoSource | ListSource]:
    """One example source per configured task: `data[task]` is "demo" (default: generated scenes, or
    generated identities for the embedding tasks), a spec name or spec file from tasks/, or a canonical
    `.jsonl` file."""
    scenes = DemoScenes("train", config.demo_train_scenes, seed=config.seed, max_objects=config.demo_max_objects,
                        object_size=config.demo_object_size)
    sources: dict[str, DemoSource | ListSource] = {}
    for task in config.tasks:
        get_task(task)  # unknown task names fail here, listing the registered ones
        data = config.data.get(task, DEMO)
        if data == DEMO and task in IDENTITY_TASKS:  # embedding tasks: generated identities, not scenes
            identities = DemoIdentities(task, "train", config.demo_train_identities, seed=config.seed)
            sources[task] = ListSource(task, identities, config.seed, "demo_train_identities")
        elif data == DEMO:
            if len(scenes) == 0:
                raise DataSourceError("demo_train_scenes is 0: the demo training set is empty")
            sources[task] = DemoSource(task, scenes, config.seed)
        elif data.endswith(".jsonl"):
            sources[task] = _jsonl_source(task, data, config.seed)
        else:
            sources[task] = _spec_source(task, data, config.seed)
        try:
            sources[task] = get_task(task).training_source(sources[task], config.seed)  # e.g. P x K draws
        except ValueError as error:
            raise DataSourceError(str(error)) from None
    if config.caption_dropout:
        sources["text_to_image"] = CaptionDropout(sources["text_to_image"], config.caption_dropout, config.seed)
    return sources


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
    from ofa_ufo.evaluate import open_examples
    from ofa_ufo.data.specs import TaskSpec, list_specs, load_spec

    if data.endswith(".jsonl"):
        from ofa_ufo.data.loaders.jsonl import load_jsonl

        if task not in config.eval_data:
            return [], None  # a training file has no held-out side
        examples = [e for e in load_jsonl(data) if e["task"] == task][: config.eval_examples]
        return examples, TaskSpec(name=data, task=task, data={}, metric=get_task(task).metric)
    if data == DEMO:
        name = f"demo_{task}"
        if name not in list_specs():
            return [], None
        spec = load_spec(name)
        size = {"val_scenes": config.eval_examples, "max_objects": config.demo_max_objects,
                "object_size": list(config.demo_object_size)}
        if spec.data.get("source") == "demo_identities":
            size = {"val_examples": config.eval_examples}
        spec = replace(spec, data={**spec.data, **size})
    else:
        spec = load_spec(data)
    return list(islice(open_examples(spec, split="val"), config.eval_examples)), spec


@dataclass
class Mixture:
    """Per-step global batches of the configured mixture; position = number of steps taken."""

    sources: dict[str, DemoSource | ListSource]
    quotas: dict[str, int]

    def micro_batch(self, step: int, micro: int, grad_accum: int) -> list[dict[str, Any]]:
        """Examples of micro-batch `micro` of optimizer step `step` (same on every process)."""
        examples = []
        for task, quota in self.quotas.items():
            first = (step * grad_accum + micro) * quota
            examples += [self.sources[task].draw(k) for k in range(first, first + quota)]
        return examples


def build_batch(processor, examples: Sequence[dict[str, Any]], style: str = "ofa",
                vqgan=None) -> dict[str, torch.Tensor]:
    """Examples of any tasks -> one padded batch (prompts and targets from each task's builder);
    a task without a token target (target None, e.g. embedding tasks) gets an all-ignored label row.

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
    inputs["task_ids"] = torch.tensor([task_id(e["task"]) for e in examples])  # routes a UFO supernet
    return inputs
