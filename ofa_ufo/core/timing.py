"""Wall-clock latency, and the processor it was measured on: the one timer of the benchmarks and
`ofa_ufo.deploy.subnet_report`, so that their figures mean the same thing.

    with torch.inference_mode():
        seconds = median_time(lambda: model(**inputs), repeats=5)
    print(f"{seconds * 1e3:.1f} ms on {device_name()}")
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Clock = Callable[[], float]

__all__ = ["Clock", "cpu_name", "device_name", "interleaved_times", "median_time", "run_times", "time_call"]


def _synchronize() -> None:
    if torch.cuda.is_initialized():  # queued kernels belong to the call that launched them
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], clock: Clock = time.perf_counter) -> float:
    """Seconds one call of `fn` takes, GPU work it queued included."""
    _synchronize()
    start = clock()
    fn()
    _synchronize()
    return clock() - start


def run_times(fn: Callable[[], Any], repeats: int, warmup: int = 1, clock: Clock = time.perf_counter) -> list[float]:
    """Seconds of each of `repeats` timed calls, after `warmup` untimed ones: first calls pay for
    lazy initialisation, allocator growth and cold caches, which a latency figure leaves out."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return [time_call(fn, clock) for _ in range(repeats)]


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, clock: Clock = time.perf_counter) -> float:
    """Median seconds of one call of `fn` (see `run_times`); the median, so that one run slowed by
    another process on a shared machine does not move the figure."""
    return statistics.median(run_times(fn, repeats, warmup, clock))


def interleaved_times(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                      clock: Clock = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each call of several functions timed side by side: `warmup` untimed calls of each,
    then `rounds` rounds that call each once, the order rotating by one every round. On a shared
    machine whose speed drifts over minutes, timing one function after the other would hand the drift
    to their ratio; interleaved, every function sees the same mix of fast and slow moments."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(time_call(fns[name], clock))
    return times


def cpu_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux `/proc/cpuinfo`; elsewhere what `platform` knows)."""
    try:
        for line in Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str = "cpu") -> str:
    """The processor a figure was measured on, for the line printed above a benchmark's table:
    the GPU's name for a CUDA device, else the CPU's with its core and torch thread counts."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
