"""Device profiles: the latency of a (sub)net on a named target, and a per-target record of them.

Targets: `cpu-fp32`, `cpu-bf16` (only where the CPU is fast at bf16: AMX / AVX512-BF16),
`onnx-cpu` and `onnx-cpu-int8` (ONNX Runtime, through `ofa_ufo.deploy.onnx_export`) and `cuda`.
The workload is what a deployed model does per request: one image and the task's prompt, the
encoder, then a fixed number of greedy decoder steps (`new_tokens`: the end token banned by one slice write
per step, `end_banned`, so that every arch decodes the same length without `min_new_tokens`' vocabulary-wide
passes, work no real request does). The figure is the median of `repeats` runs after `warmup` runs, and the
processor it ran on is saved with it.

A `ProfileStore` keeps every measurement of one target, one machine and one workload (`WORKLOAD`) in a JSON
file, so a search fits its latency predictor to what was measured before instead of timing every candidate
again.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ofa_ufo.core.hardware import precision_support
from ofa_ufo.core.timing import device_name, interleaved_times, run_times
from ofa_ufo.deploy.nas import arch_from_dict, arch_to_dict
from ofa_ufo.deploy.onnx_export import export_onnx, load_onnx_model
from ofa_ufo.generation.constraints import end_banned
from ofa_ufo.models.ufo import SupernetArch
from ofa_ufo.tasks import get_task

__all__ = ["TARGETS", "WORKLOAD", "LatencyRecord", "ProfileStore", "check_target", "measure_latencies",
           "measure_latency", "request_inputs"]

TARGETS = {
    "cpu-fp32": "PyTorch on this CPU, fp32",
    "cpu-bf16": "PyTorch on this CPU, bf16 weights (only on CPUs with AMX or AVX512-BF16)",
    "onnx-cpu": "ONNX Runtime on this CPU, fp32 graphs",
    "onnx-cpu-int8": "ONNX Runtime on this CPU, dynamic int8 quantised graphs",
    "cuda": "PyTorch on the CUDA GPU, bf16 where the GPU supports it",
}

# what one timed request does; a store written for another workload is on another scale and is not used
WORKLOAD = "batch 1, greedy, new_tokens steps with the end token banned"


def check_target(name: str) -> None:
    """Raise a ValueError for an unknown target or one this machine cannot run, saying why."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    if name == "cpu-bf16":
        support = precision_support("cpu")
        if not support.bf16_fast:
            raise ValueError(f"target cpu-bf16 needs a CPU that is fast at bf16; {support.summary}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("target cuda needs a CUDA GPU; torch sees none on this machine")


def target_device(name: str) -> str:
    """The processor a target's figures belong to (saved with every measurement)."""
    return device_name("cuda") if name == "cuda" else device_name("cpu")


@dataclass
class LatencyRecord:
    target: str
    ms: float
    repeats: int
    new_tokens: int
    device: str
    arch: dict[str, Any] | None = None


def request_inputs(processor, task: str, image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One request of `task`: a random image at the model's size and the task's prompt."""
    pixels = np.random.default_rng(seed).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    task_object = get_task(task)
    text = "the red circle" if task == "grounding" else "what color is the circle?" if task == "vqa" else None
    prompt = task_object.prompt(text) if text else task_object.prompt()
    return dict(processor(images=Image.fromarray(pixels), text=prompt))


def _runner(model, target: str, workdir: Path) -> Callable[[dict[str, torch.Tensor], int], Any]:
    """A function running one request of generation on `target` (the model copied/exported as needed)."""
    if target.startswith("onnx"):
        out = workdir / target
        export_onnx(model, out, quantize="int8" if target.endswith("int8") else None)
        model, device = load_onnx_model(out), torch.device("cpu")
    elif target == "cpu-bf16":
        model, device = copy.deepcopy(model).to(torch.bfloat16), torch.device("cpu")
    elif target == "cuda":
        model, device = copy.deepcopy(model).to("cuda", precision_support("cuda").dtype), torch.device("cuda")
    else:
        model, device = model.float(), torch.device("cpu")

    no_end = end_banned(model.generation_config.eos_token_id)

    def run(inputs: dict[str, torch.Tensor], new_tokens: int):
        dtype = getattr(model, "dtype", torch.float32)
        moved = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        with torch.inference_mode():
            return model.generate(**moved, max_new_tokens=new_tokens, num_beams=1, do_sample=False,
                                  logits_processor=no_end)
    return run


def measure_latency(model, processor, target: str, task: str = "caption", repeats: int = 10, warmup: int = 2,
                    new_tokens: int = 8, arch: SupernetArch | None = None) -> LatencyRecord:
    """Median latency (ms) of one `task` request of `model` (a dense or extracted model) on `target`."""
    check_target(target)
    if model.get_encoder().supernet is not None and model.get_encoder().supernet.routed:
        raise ValueError("measure an extracted subnet, not the routed supernet: "
                         "ofa_ufo.extract_subnet(model, task, arch) first")
    inputs = request_inputs(processor, task, model.config.image_size)
    with tempfile.TemporaryDirectory(prefix="ofa_ufo_profile_") as workdir:
        run = _runner(model.eval(), target, Path(workdir))
        times = run_times(lambda: run(inputs, new_tokens), repeats, warmup)
    return LatencyRecord(target, 1e3 * float(np.median(times)), repeats, new_tokens, target_device(target),
                         arch_to_dict(arch) if arch is not None else None)


def measure_latencies(models: dict[SupernetArch, Any], processor, target: str, task: str = "caption",
                      rounds: int = 10, warmup: int = 2, new_tokens: int = 8) -> dict[SupernetArch, LatencyRecord]:
    """`measure_latency` for several extracted subnets (keyed by arch) at once, timed in interleaved rounds
    (`ofa_ufo.core.timing.interleaved_times`): subnets that differ by a few percent are ranked by their
    cost, not by the machine's drift between one subnet's turn and the next."""
    check_target(target)
    with tempfile.TemporaryDirectory(prefix="ofa_ufo_profile_") as workdir:
        runs, inputs = {}, None
        for index, (arch, model) in enumerate(models.items()):
            if model.get_encoder().supernet is not None and model.get_encoder().supernet.routed:
                raise ValueError("measure extracted subnets, not the routed supernet")
            inputs = inputs or request_inputs(processor, task, model.config.image_size)
            runs[arch] = _runner(model.eval(), target, Path(workdir) / str(index))
        times = interleaved_times({arch: (lambda run=run: run(inputs, new_tokens)) for arch, run in runs.items()},
                                  rounds, warmup)
    return {arch: LatencyRecord(target, 1e3 * float(np.median(times[arch])), rounds, new_tokens,
                                target_device(target), arch_to_dict(arch)) for arch in models}


class ProfileStore:
    """Measured latencies of one target on one machine, kept in a JSON file across runs.

    Records measured on another processor or for another workload (`WORKLOAD`) are not mixed in: loading
    such a file warns and starts empty (the file is rewritten on the next `add`)."""

    def __init__(self, path: str | os.PathLike, target: str):
        self.path, self.target, self.device = Path(path), target, target_device(target)
        self.records: list[LatencyRecord] = []
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                records = [LatencyRecord(**r) for r in data["records"]]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{self.path}: not a latency profile ({error})") from error
            if (data.get("target"), data.get("device"), data.get("workload")) != (target, self.device, WORKLOAD):
                warnings.warn(f"{self.path} holds {data.get('target')!r} on {data.get('device')!r} timed as "
                              f"{data.get('workload')!r}, not {target!r} on {self.device!r} timed as {WORKLOAD!r}: "
                              "its records are not used")
            else:
                self.records = records

    def lookup(self, arch: SupernetArch) -> float | None:
        """The stored latency (ms) of `arch`, if it was measured before."""
        key = arch_to_dict(arch)
        return next((r.ms for r in reversed(self.records) if r.arch == key), None)

    def archs(self) -> list[tuple[SupernetArch, float]]:
        return [(arch_from_dict(r.arch), r.ms) for r in self.records if r.arch is not None]

    def add(self, record: LatencyRecord) -> None:
        """Keep `record` and rewrite the file atomically."""
        self.records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"target": self.target, "device": self.device, "workload": WORKLOAD,
                "records": [asdict(r) for r in self.records]}
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(partial, self.path)
