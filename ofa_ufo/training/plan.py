"""`python -m ofa_ufo.training --config NAME --plan [--nodes N --gpus G]`: size a run before launching it.

Per process: the parameters, the memory of the weights, gradients and AdamW state, the activation memory of
the micro-batch (measured here on one small micro-batch, scaled linearly: an estimate), the gradient
accumulation that reaches the config's global batch, the step rate measured in a few steps on this
machine, the steps per epoch, and the command that launches the run on N nodes of G GPUs (torchrun, or
accelerate with FSDP, `run_scripts/accelerate_fsdp.yaml`, for models of OFA-Large's size and up).

How activations are measured: a `torch.autograd.graph.saved_tensors_hooks` pair sees every tensor the
forward pass keeps for the backward pass; the plan adds up the distinct storages among them that are not
parameters. That is what a micro-batch holds at the end of its forward pass, the peak of a step besides
the transient buffers of single ops. The process's peak resident memory (`getrusage`) growth during the
same step (on a GPU: its peak allocated bytes) is printed beside it: it also holds the gradients, the
AdamW state created by the first update and the allocator's caching, so it is an upper bound.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ofa_ufo.data.sources import DataSourceError, expand_env
from ofa_ufo.data.streaming import find_shards
from ofa_ufo.tasks import get_task
from ofa_ufo.training.config import ConfigError, TrainConfig
from ofa_ufo.training.mixture import build_sources
from ofa_ufo.training.model_setup import build_model, freeze, set_train_mode
from ofa_ufo.training.task_heads import build_auxiliary_heads, build_heads, model_head_overrides
from ofa_ufo.training.trainer import Trainer

GIB = 1024 ** 3
# fp32 bytes per parameter: the weights (also under bf16 autocast, whose bf16 copy of each trained weight
# lives from its first use in the forward until backward has used it: 2 bytes more per trainable parameter)
WEIGHT_BYTES = 4
GRAD_BYTES = 4  # fp32 gradient per trainable parameter
ADAMW_BYTES = 8  # AdamW's two fp32 moments per trainable parameter
# models from this size up (OFA-Large: 430M parameters, Huge) are sharded with FSDP: replicated, their weights,
# gradients and AdamW state (16 bytes a parameter) take 7 GB and more of every GPU before any activation
FSDP_FROM_PARAMETERS = 300_000_000
FSDP_CONFIG = "run_scripts/accelerate_fsdp.yaml"
LINE_COUNTED = (".jsonl", ".tsv")  # one record per line: countable without parsing


@dataclass
class Cluster:
    """Where the run goes: `nodes` machines of `gpus` processes (one per GPU) each."""

    nodes: int = 1
    gpus: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus < 1:
            raise ConfigError(f"--nodes and --gpus must be >= 1, got nodes={self.nodes} gpus={self.gpus}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus


@dataclass
class StepMeasure:
    """One small micro-batch trained for a few steps on this machine."""

    batch: int  # samples per step (one micro-batch, one process)
    steps: int  # timed steps (after the first, which also measures memory)
    seconds_per_step: float
    cpu_seconds_per_step: float  # this process's CPU time: far below wall x threads on a shared machine
    activation_bytes: int  # tensors kept for backward by one micro-batch of `batch` samples
    peak_growth_bytes: int  # peak memory growth during the first step (GPU allocated, or process resident)
    device: str

    @property
    def samples_per_second(self) -> float:
        return self.batch / self.seconds_per_step


@dataclass
class Plan:
    config_name: str  # as given to --config ("": the defaults)
    overrides: list[str]
    cluster: Cluster
    micro_batch: int  # samples per micro-batch per process
    grad_accum: int
    global_batch: int  # what micro_batch x processes x grad_accum gives (>= the config's)
    config_global_batch: int
    parameters: int
    trainable: int
    optimizer_parameters: int  # the model's trainable parameters and the training heads'
    examples: int | None  # one epoch's examples, None where the data cannot be counted
    measure: StepMeasure | None

    @property
    def fsdp(self) -> bool:
        return self.parameters >= FSDP_FROM_PARAMETERS


def grad_accum_for(global_batch: int, micro_batch: int, world: int) -> tuple[int, int]:
    """(micro-batches accumulated per step, the global batch they give): the fewest that reach at least
    `global_batch` samples with `micro_batch` samples on each of `world` processes."""
    if min(global_batch, micro_batch, world) < 1:
        raise ConfigError(f"global batch, micro-batch and processes must be >= 1, got {global_batch}, "
                          f"{micro_batch}, {world}")
    per_pass = micro_batch * world
    accum = math.ceil(global_batch / per_pass)
    return accum, accum * per_pass


def steps_per_epoch(examples: int, global_batch: int) -> int:
    """Optimizer steps that draw `examples` samples (the last one partly)."""
    return math.ceil(examples / global_batch)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, those that train), each shared tensor counted once."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    return (sum(p.numel() for p in seen.values()),
            sum(p.numel() for p in seen.values() if p.requires_grad))


def static_bytes(parameters: int, trainable: int, world: int = 1, sharded: bool = False) -> dict[str, int]:
    """Bytes per process of the fp32 weights, gradients and AdamW moments; FSDP divides them by the processes."""
    share = world if sharded else 1
    return {"weights": math.ceil(parameters * WEIGHT_BYTES / share),
            "gradients": math.ceil(trainable * GRAD_BYTES / share),
            "adamw": math.ceil(trainable * ADAMW_BYTES / share)}


# ---- counting the data -------------------------------------------------------------------------------------

def _count_lines(path: str) -> int:
    """Records of a one-record-per-line file, read in 1 MiB blocks."""
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _task_examples(config: TrainConfig, task: str) -> int | None:
    """One task's training examples: generated ones from the config, records of .jsonl/.tsv files (a
    file, a folder or a shard pattern); None for what cannot be counted without reading it (tar shards,
    specs, Hugging Face datasets) or a path whose environment variable is unset."""
    data = config.data.get(task, "demo")
    if data == "demo":
        kind = get_task(task).demo_data
        return config.demo_train_scenes if kind == "scenes" else config.demo_train_identities * 8
    try:
        names = find_shards(expand_env(data))
    except (DataSourceError, ValueError, OSError):
        return None
    if not names or any(Path(name).suffix not in LINE_COUNTED for name in names):
        return None
    return sum(_count_lines(name) for name in names)


def count_examples(config: TrainConfig) -> int | None:
    """Examples in one pass over every task's training data, or None when any of them cannot be counted."""
    counts = [_task_examples(config, task) for task in config.tasks]
    return None if None in counts else sum(counts)


# ---- measuring a few steps ---------------------------------------------------------------------------------

class _SavedTensors:
    """Adds up the distinct non-parameter storages the forward pass saves for backward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _memory_mark(device: torch.device) -> int:
    """Bytes in use now on a GPU (its peak counter reset), else the process's peak resident memory so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _peak_growth(device: torch.device, mark: int) -> int:
    """How far the peak rose above `mark` (`_memory_mark`): the GPU's allocated bytes or the resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - mark
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - mark


def measurement_config(config: TrainConfig, batch: int, steps: int, output_dir: str) -> TrainConfig:
    """The config trained for the measurement: `batch` samples, one micro-batch, `steps` steps, generated
    demo data at the config's model and image size (no data needed), no evaluation or warm-up."""
    if batch < len(config.tasks):
        raise ConfigError(f"the measured batch ({batch}) must hold one sample of each of the {len(config.tasks)} tasks")
    return dataclasses.replace(config, data={}, batch_size=batch, grad_accum=1, max_steps=steps, eval_examples=0,
                               stem_warmup_images=0, data_workers=0, demo_train_scenes=max(64, batch * steps),
                               output_dir=output_dir, save_every=0, show_photos=False)


def measure_steps(config: TrainConfig, batch: int, steps: int = 3) -> StepMeasure:
    """Train `steps` steps of `batch` samples in this process: the first counts the activations (and warms
    up), the others are timed."""
    if steps < 2:
        raise ConfigError(f"measuring needs at least 2 steps (one warm-up, one timed), got {steps}")
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(measurement_config(config, batch, steps, output_dir), resume="never")
        set_train_mode(trainer.model, config.freeze_batchnorm)
        saved = _SavedTensors(trainer.unwrapped)
        where = trainer.accelerator.device
        mark = _memory_mark(where)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
            trainer.train_step()
        growth = _peak_growth(where, mark)
        start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(1, steps):
            trainer.step = step  # the mixture draws each step's own examples
            trainer.train_step()
        seconds = (time.perf_counter() - start) / (steps - 1)
        cpu_seconds = (time.process_time() - cpu_start) / (steps - 1)
        device = f"{where.type}, {torch.get_num_threads()} threads, {trainer.precision.precision}"
    return StepMeasure(batch, steps - 1, seconds, cpu_seconds, saved.total, growth, device)


# ---- the plan ----------------------------------------------------------------------------------------------

def count_model(config: TrainConfig) -> tuple[int, int, int]:
    """(parameters, trainable ones, those AdamW updates: the trainable ones and the training heads') of the
    model the config trains, with its `freeze` settings applied. Heads sized by the data (embedding tasks'
    identities, the dense head's classes) are counted over the generated demo data."""
    sources = build_sources(dataclasses.replace(config, data={}, demo_train_scenes=64))
    model, _ = build_model(config, model_head_overrides(config, sources))
    freeze(model, config)
    total, trainable = parameter_counts(model)
    heads = [build_heads(sources, model.config.d_model), build_auxiliary_heads(config, model.config.d_model)]
    return total, trainable, trainable + sum(parameter_counts(head)[1] for head in heads)


def make_plan(config: TrainConfig, config_name: str, overrides: list[str] | None = None, cluster: Cluster | None = None,
              micro_batch: int | None = None, examples: int | None = None, measure_batch: int | None = None,
              measure: bool = True) -> Plan:
    """The plan of `config` on `cluster`; `micro_batch` samples per process and micro-batch (default: the
    config's `batch_size` split over the processes), `examples` per epoch (default: counted from the data)."""
    cluster = cluster or Cluster()
    micro = micro_batch or max(1, config.batch_size // cluster.world)
    accum, global_batch = grad_accum_for(config.global_batch, micro, cluster.world)
    if micro * cluster.world < len(config.tasks):
        raise ConfigError(f"a micro-batch of {micro} x {cluster.world} processes cannot hold one sample of each of "
                          f"the {len(config.tasks)} tasks; raise --micro-batch")
    total, trainable, optimized = count_model(config)
    step = measure_steps(config, measure_batch or len(config.tasks)) if measure else None
    return Plan(config_name, list(overrides or []), cluster, micro, accum, global_batch, config.global_batch, total,
                trainable, optimized, examples if examples is not None else count_examples(config), step)


def launch_command(plan: Plan) -> str:
    """The command that starts the planned run on every node (the same on each; torchrun's rendezvous or
    accelerate's machine rank tells the nodes apart)."""
    fields = [*plan.overrides, f"batch_size={plan.micro_batch * plan.cluster.world}", f"grad_accum={plan.grad_accum}"]
    config = ["--config", plan.config_name] if plan.config_name else []  # "": the defaults
    trainer = "-m ofa_ufo.training " + " ".join(map(shlex.quote, [*config, *fields]))
    nodes, gpus = plan.cluster.nodes, plan.cluster.gpus
    if plan.fsdp:
        where = "" if nodes == 1 else " --machine_rank $NODE_RANK --main_process_ip $MASTER_ADDR --main_process_port 29500"
        return (f"accelerate launch --config_file {FSDP_CONFIG} --num_machines {nodes} "
                f"--num_processes {plan.cluster.world}{where} {trainer}")
    if nodes == 1:
        return f"torchrun --standalone --nproc-per-node {gpus} {trainer}"
    return (f"torchrun --nnodes {nodes} --nproc-per-node {gpus} --rdzv-backend c10d "
            f"--rdzv-endpoint $MASTER_ADDR:29500 --rdzv-id $JOB_ID {trainer}")


def _gib(count: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{count / GIB:.2f} GiB" if count >= GIB else f"{count / 2 ** 20:.1f} MiB"


def _memory_lines(plan: Plan) -> list[str]:
    """Per-process memory: static parts, then the activations scaled from the measured micro-batch."""
    static = static_bytes(plan.parameters, plan.optimizer_parameters, plan.cluster.world, plan.fsdp)
    how = f"sharded over {plan.cluster.world} processes (FSDP)" if plan.fsdp else "replicated (DDP)"
    lines = [f"  weights fp32 {_gib(static['weights'])}, gradients {_gib(static['gradients'])}, AdamW moments "
             f"{_gib(static['adamw'])}  ({how}; bf16 autocast adds a 2-byte copy of each trained weight)"]
    measured = plan.measure
    if measured is None:
        return lines + ["  activations: not measured"]
    per_sample = measured.activation_bytes / measured.batch
    activations = per_sample * plan.micro_batch
    lines += [f"  activations ~{_gib(activations)} for a micro-batch of {plan.micro_batch} (estimate: "
              f"{_gib(measured.activation_bytes)} measured for {measured.batch} samples, scaled linearly; "
              f"{measured.device} — bf16 autocast saves most of them at half the size)",
              f"  total ~{_gib(sum(static.values()) + activations)} per process "
              f"(measuring step: peak memory grew {_gib(measured.peak_growth_bytes)})"]
    return lines


def _data_lines(plan: Plan) -> list[str]:
    if plan.examples is None:
        return ["steps per epoch: the data cannot be counted here (unset path variable, tar shards, a spec or a "
                "Hugging Face dataset): pass --examples N"]
    steps = steps_per_epoch(plan.examples, plan.global_batch)
    return [f"steps per epoch: {steps:,} ({plan.examples:,} examples / {plan.global_batch} per step)"]


def format_plan(plan: Plan) -> str:
    """The plan as the CLI prints it."""
    cluster = plan.cluster
    lines = [f"plan for {plan.config_name or '(defaults)'} on {cluster.nodes} node(s) x {cluster.gpus} GPU(s) = {cluster.world} "
             f"process(es)",
             f"parameters: {plan.parameters:,} total, {plan.trainable:,} trainable "
             f"({plan.optimizer_parameters:,} with the training heads, updated by AdamW)",
             f"batch: {plan.micro_batch} per process x {cluster.world} processes x grad_accum {plan.grad_accum} = "
             f"{plan.global_batch} per step (config: {plan.config_global_batch})",
             "memory per process:", *_memory_lines(plan)]
    if plan.measure is not None:
        measured = plan.measure
        lines.append(f"throughput here: {measured.samples_per_second:.2f} samples/s ({measured.seconds_per_step:.2f} s "
                     f"per step of {measured.batch} samples, mean of {measured.steps}; {measured.device}; "
                     f"{measured.cpu_seconds_per_step:.2f} s of CPU time per step)")
    lines += _data_lines(plan)
    lines.append(f"launch (on every node):\n  {launch_command(plan)}")
    return "\n".join(lines)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan as plain data (for scripts)."""
    return {**dataclasses.asdict(plan), "fsdp": plan.fsdp, "launch": launch_command(plan)}
