"""The micro-batches of each optimizer step, built in the training process or ahead of it by
DataLoader workers (`data_workers`), with the same content either way."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from ofa_ufo.core.images import ImageLoadError, load_image
from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.training.mixture import Mixture, build_batch

Batch = tuple[dict[str, torch.Tensor], list[dict[str, Any]]]  # (padded batch, its examples without images)


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable data); the last good checkpoint is kept."""


def loadable(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Examples with their images decoded; an unreadable image drops its sample (with a warning), not the batch."""
    kept = []
    for example in examples:
        try:
            image = example.get("image")
            kept.append({**example, "image": None if image is None else load_image(image)})
        except ImageLoadError as error:
            warnings.warn(f"skipping sample {example.get('id')!r}: {error}", stacklevel=2)
    return kept


def _without_image(example: dict[str, Any]) -> dict[str, Any]:
    """The example as the losses read it: the image replaced by its (width, height)."""
    image = example.get("image")
    return {**{k: v for k, v in example.items() if k != "image"}, "image_size": None if image is None else image.size}


class StepBatches(torch.utils.data.Dataset):
    """Micro-batch `index = step * grad_accum + micro` of one process, built on the CPU. A batch
    depends on its index alone (seeded draws), so DataLoader workers can build the next steps while
    the model trains on this one without changing a loss, and a resumed run picks up at its step's
    index. `model_config` gives each row's route in the model's task vocabulary."""

    def __init__(self, mixture: Mixture, processor, model_config: OFAUFOConfig, vqgan, grad_accum: int, rank: int,
                 world: int, total_steps: int) -> None:
        self.mixture, self.processor, self.model_config, self.vqgan = mixture, processor, model_config, vqgan
        self.grad_accum, self.rank, self.world, self.total_steps = grad_accum, rank, world, total_steps

    def __len__(self) -> int:
        return self.total_steps * self.grad_accum

    def __getitem__(self, index: int) -> Batch:
        step, micro = divmod(index, self.grad_accum)
        examples = self.mixture.micro_batch(step, micro, self.grad_accum)[self.rank::self.world]
        examples = loadable(examples)
        if not examples:
            raise TrainingError(f"step {step}: every sample of micro-batch {micro} failed to load")
        batch = build_batch(self.processor, examples, self.model_config, vqgan=self.vqgan)
        return batch, [_without_image(e) for e in examples]


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _as_is(item: Any) -> Any:
    """DataLoader collate for items that are already whole batches."""
    return item


class MicroBatches:
    """A step's micro-batches on the device, from `batches` directly or, with `workers` > 0, from
    DataLoader workers that are (re)started at the step's index whenever the run jumps."""

    def __init__(self, batches: StepBatches, workers: int, device: torch.device) -> None:
        self.batches, self.workers, self.device = batches, workers, device
        self._prefetched: tuple[int, Any] | None = None  # (next index, DataLoader iterator)

    def for_step(self, step: int) -> list[Batch]:
        first = step * self.batches.grad_accum
        indices = range(first, first + self.batches.grad_accum)
        if not self.workers:
            items = [self.batches[i] for i in indices]
        else:
            iterator = self._iterator(first)
            items = [next(iterator) for _ in indices]
            self._prefetched = (indices.stop, iterator)
        return [({k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, examples)
                for batch, examples in items]

    def _iterator(self, first: int):
        if self._prefetched is None or self._prefetched[0] != first:
            loader = torch.utils.data.DataLoader(
                self.batches, batch_size=None, sampler=range(first, len(self.batches)), collate_fn=_as_is,
                num_workers=min(self.workers, _usable_cpus()), pin_memory=self.device.type == "cuda",
                generator=torch.Generator())  # its own: seeding workers from the global RNG would shift dropout on resume
            self._prefetched = (first, iter(loader))
        return self._prefetched[1]

    def stop(self) -> None:
        """End the data workers (a later step starts new ones)."""
        self._prefetched = None
