"""What a run reports as it goes (main process only): the progress bar, a console line every
`log_every` steps when stderr is not a terminal, and TensorBoard scalars in `output_dir/tensorboard`:
loss (with its parts under distillation), LR, samples/s and, for a routed UFO supernet, each task's router
probabilities every step; held-out metrics and the encoder image signal at each evaluation."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from ofa_ufo.deploy.subnets import log_router_probabilities
from ofa_ufo.training.config import TrainConfig


def _routed(model) -> bool:
    """Whether `model` has a UFO supernet that routes tasks (its router probabilities are worth a plot)."""
    vision = model.config.vision_config
    return bool(vision.supernet_layers and vision.supernet_routed)


def _summary_writer(output_dir: Path):
    # tensorboard is a heavy import (and only the main process writes): load it when a run starts
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(output_dir / "tensorboard"))


class RunLog:
    """The run's logs; on a process other than the main one every call does nothing."""

    def __init__(self, output_dir: Path, config: TrainConfig, main: bool) -> None:
        self.config, self.main = config, main
        self.writer = _summary_writer(output_dir) if main else None
        self.bar = None
        self._tick = time.perf_counter()

    def header(self, line: str) -> None:
        """A line that says how the run runs (e.g. the precision and the hardware that chose it): printed
        before the first step and kept in TensorBoard's text tab."""
        if self.main:
            print(line, flush=True)
            self.writer.add_text("run", line)

    def progress(self, start: int) -> Iterator[int]:
        """The steps from `start` to `max_steps`, behind a progress bar; the samples/s clock starts here."""
        self.bar = tqdm(range(start, self.config.max_steps), desc="train", unit="step", initial=start,
                        total=self.config.max_steps, disable=not self.main)
        self._tick = time.perf_counter()
        return iter(self.bar)

    def step(self, step: int, loss: float, lr: float, model, parts: dict[str, float] | None = None) -> None:
        """Log optimizer step `step` (1-based) of `model` (unwrapped) that ended with `loss` at `lr`; `parts`:
        the loss's parts under distillation (name -> value, `train/distill/<name>` in TensorBoard)."""
        now = time.perf_counter()
        rate, self._tick = self.config.global_batch / max(now - self._tick, 1e-9), now
        if not self.main:
            return
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        for name, value in (("loss", loss), ("lr", lr), ("samples_per_s", rate)):
            self.writer.add_scalar(f"train/{name}", value, step)
        for name, value in (parts or {}).items():
            self.writer.add_scalar(f"train/distill/{name}", value, step)
        if _routed(model):
            log_router_probabilities(self.writer, model, step)
        if step % self.config.log_every == 0 and not self.bar.disable and not os.isatty(2):
            shares = "".join(f" {name} {value:.4f}" for name, value in (parts or {}).items())
            print(f"step {step}/{self.config.max_steps} loss {loss:.4f} lr {lr:.2e} samples/s {rate:.1f}{shares}",
                  flush=True)

    def evaluation(self, step: int, metrics: dict[str, dict[str, float]], image_signal: float | None) -> None:
        """Log the held-out metrics (task -> name -> value) and image signal of an evaluation at `step`."""
        if not self.main:
            return
        if image_signal is not None:
            self.writer.add_scalar("eval/encoder_image_signal", image_signal, step)
        for task, values in metrics.items():
            for name, value in values.items():
                self.writer.add_scalar(f"eval/{task}/{name}", value, step)

    def end_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
