"""The trainer: one loop for every task mixture, on accelerate.

    from ofa_ufo.training import load_config, train
    result = train(load_config("pretrain_ofa_tiny", ["max_steps=200"]))

Each optimizer step builds its global batch from the mixture (every task, fixed quotas),
keeps this process's slice, and divides the summed token loss by the token count of the
whole step (all micro-batches, all processes): gradient accumulation and data-parallel runs
give the update of one big batch; embedding tasks add their feature-head losses (CosFace +
triplet, `build_heads`; the heads are optimised with the model and kept in the checkpoint's
trainer state), and grounding rows optionally a box-mask loss on the image tokens
(`box_mask_weight`). Batches are built in the training process or ahead of it by DataLoader
workers (`data_workers`). Around it: AdamW with warmup + linear decay (OFA), gradient
clipping, optional EMA, bf16 autocast on a GPU, supernet arch sampling when the config asks
for it, atomic resumable checkpoints, evaluation before/after, TensorBoard, a loss plot and a
metric table.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ofa_ufo.core.images import ImageLoadError, load_image
from ofa_ufo.deploy.subnets import largest_arch, sample_arch, set_arch, smallest_arch
from ofa_ufo.tasks import get_task
from ofa_ufo.tasks.identities import IdentityClassifier, save_identities
from ofa_ufo.training import checkpoint as ckpt
from ofa_ufo.training import objectives
from ofa_ufo.training.box_mask import box_mask_loss
from ofa_ufo.training.config import ConfigError, TrainConfig
from ofa_ufo.training.mixture import Mixture, build_batch, build_sources, eval_examples, task_quotas
from ofa_ufo.training.report import (
    encoder_image_signal, evaluate_model, format_metric_table, plot_history, show_real_photos,
)
from ofa_ufo.training.stem_warmup import warm_up_stem

class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable data); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    output_dir: Path
    losses: list[float]
    metrics_before: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics_after: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def step_archs(config, step: int) -> list:
    """The supernet archs one step trains: [None] (the model as is) unless the config asks for
    elastic sampling (`sample_arch(config, step)`, plus largest and smallest with the sandwich rule)."""
    vision = config.vision_config
    if not (vision.supernet_layers and vision.supernet_routed and vision.supernet_sample_arch):
        return [None]
    archs = [sample_arch(config, step)]
    return archs + ([largest_arch(config), smallest_arch(config)] if vision.supernet_sandwich else [])


def build_model(config: TrainConfig):
    """(model, processor): a preset built from scratch, or a save_pretrained directory to fine-tune."""
    from ofa_ufo.hf.presets import create_model, create_processor, list_models

    if Path(config.model).is_dir():
        from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
        from ofa_ufo.hf.processing import OFAUFOProcessor

        model = OFAUFOForConditionalGeneration.from_pretrained(config.model, **config.model_overrides)
        return model, OFAUFOProcessor.from_pretrained(config.model)
    if config.model.split(".", 1)[0] not in list_models():
        raise ConfigError(f"model {config.model!r} is neither a preset ({', '.join(list_models())}) "
                          "nor a save_pretrained directory")
    torch.manual_seed(config.seed)
    model = create_model(config.model, **config.model_overrides)
    image_size = model.config.image_size
    return model, create_processor(config.model, image_size=image_size)


def _load_vqgan(path: str):
    """The `vqgan` config field's model (CPU, eval), or None when the field is empty."""
    if not path:
        return None
    from ofa_ufo.hf.modeling_vqgan import VQGANModel

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"field 'vqgan': {path} is not a VQGANModel.save_pretrained directory (no config.json)")
    return VQGANModel.from_pretrained(path).eval()


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    gpu = torch.cuda.is_available()
    precision = {"auto": "bf16" if gpu else "no", "fp32": "no", "bf16": "bf16"}[config.precision]
    # decoder image-position tables serve image generation only, so text steps leave them unused
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=not gpu, mixed_precision=precision, kwargs_handlers=[ddp])


def _schedule(step: int, warmup: int, total: int, floor: float) -> float:
    """LR multiplier: linear warmup over `warmup` steps (the first step already trains), then
    linear decay to `floor` at `total` (fairseq's polynomial_decay with power 1, as OFA)."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * max(0.0, (total - step) / max(1, total - warmup))


def _check_prefixes(model, prefixes: list[str], field: str) -> None:
    """ConfigError naming the prefixes of `field` that match no trainable parameter name."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unmatched = [prefix for prefix in prefixes if not any(n.startswith(prefix) for n in names)]
    if unmatched:
        tops = sorted({".".join(n.split(".")[:3]) for n in names})
        raise ConfigError(f"field {field!r}: prefix(es) {unmatched} match no trainable parameter; "
                          f"parameter names start with {tops}")


def _freeze(model, prefixes: list[str]) -> None:
    _check_prefixes(model, prefixes, "freeze")
    for name, param in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            param.requires_grad_(False)


def _param_groups(model, config: TrainConfig, extra: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """One AdamW group per distinct `config.lr_scale` multiplier (longest matching name prefix;
    everything else, task heads included, at 1); `lr_scale` is kept in each group for logging."""
    prefixes = sorted(config.lr_scale, key=len, reverse=True)
    _check_prefixes(model, prefixes, "lr_scale")
    groups: dict[float, list[torch.nn.Parameter]] = {1.0: list(extra)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = next((config.lr_scale[p] for p in prefixes if name.startswith(p)), 1.0)
            groups.setdefault(scale, []).append(param)
    return [{"params": params, "lr": config.lr * scale, "lr_scale": scale}
            for scale, params in groups.items() if params]


def _optimizer(model, config: TrainConfig, extra: list[torch.nn.Parameter] = ()):
    optimizer = torch.optim.AdamW(_param_groups(model, config, list(extra)), lr=config.lr, betas=config.betas,
                                  eps=config.eps, weight_decay=config.weight_decay,
                                  fused=True)  # one kernel per group, not ~6 per tensor
    warmup = math.ceil(config.warmup_ratio * config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_schedule, warmup=warmup, total=config.max_steps, floor=config.end_lr / config.lr))
    return optimizer, scheduler


def _base_lr(optimizer) -> float:
    """The scheduled LR of an unscaled parameter (`config.lr` times the schedule)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group["lr_scale"]


def _ema(model, decay: float):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay else None


def _resume_path(config: TrainConfig, resume: str | None) -> Path | None:
    if resume in (None, "never"):
        return None
    if resume == "auto":
        found = ckpt.list_checkpoints(config.output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"resume checkpoint {path} does not exist")
    return path


def _loadable(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Examples with their images decoded; an unreadable image drops its sample (with a warning), not the batch."""
    kept = []
    for example in examples:
        try:
            image = example.get("image")
            kept.append({**example, "image": None if image is None else load_image(image)})
        except ImageLoadError as error:
            warnings.warn(f"skipping sample {example.get('id')!r}: {error}", stacklevel=2)
    return kept


class StepBatches(torch.utils.data.Dataset):
    """Micro-batch `index = step * grad_accum + micro` of one process, built on the CPU: (padded
    batch, its examples without their images). A batch depends on its index alone (seeded
    draws), so DataLoader workers can build the next steps while the model trains on this one
    without changing a loss, and a resumed run picks up at its step's index."""

    def __init__(self, mixture: Mixture, processor, vqgan, grad_accum: int, rank: int, world: int,
                 total_steps: int) -> None:
        self.mixture, self.processor, self.vqgan = mixture, processor, vqgan
        self.grad_accum, self.rank, self.world, self.total_steps = grad_accum, rank, world, total_steps

    def __len__(self) -> int:
        return self.total_steps * self.grad_accum

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        step, micro = divmod(index, self.grad_accum)
        examples = self.mixture.micro_batch(step, micro, self.grad_accum)[self.rank::self.world]
        examples = _loadable(examples)
        if not examples:
            raise TrainingError(f"step {step}: every sample of micro-batch {micro} failed to load")
        batch = build_batch(self.processor, examples, vqgan=self.vqgan)
        return batch, [_without_image(e) for e in examples]


def _without_image(example: dict[str, Any]) -> dict[str, Any]:
    """The example as the losses read it: the image replaced by its (width, height)."""
    image = example.get("image")
    return {**{k: v for k, v in example.items() if k != "image"}, "image_size": None if image is None else image.size}


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _as_is(item: Any) -> Any:
    """DataLoader collate for items that are already whole batches."""
    return item


def build_heads(sources: dict[str, Any], dim: int) -> torch.nn.ModuleDict:
    """Training-only feature heads (task -> head) of the tasks that have one (`Task.training_head`,
    e.g. CosFace over an embedding task's training identities); saved in the checkpoint's trainer state."""
    heads = {}
    for task, source in sources.items():
        head = get_task(task).training_head(getattr(source, "examples", ()), dim)
        if head is not None:
            heads[task] = head
    return torch.nn.ModuleDict(heads)


def _check_identity_quotas(sources: dict[str, Any], quotas: dict[str, int]) -> None:
    """A P x K source needs a per-step quota of whole identity chunks (a multiple of K)."""
    for task, source in sources.items():
        k = getattr(source, "k", 1)
        if quotas[task] % k:
            raise ConfigError(f"task {task!r} draws identities in chunks of K={k} but gets {quotas[task]} samples "
                              "per micro-batch; choose batch_size and task ratios that give it a multiple of K")


class Trainer:
    """Holds the run's parts; `fit()` is the loop."""

    def __init__(self, config: TrainConfig, resume: str | None = "auto", model=None, processor=None) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.accelerator = _accelerator(config)
        self.output_dir = Path(config.output_dir)
        if model is None:
            model, processor = build_model(config)
        self.resume_from = _resume_path(config, resume)
        if self.resume_from is not None:
            ckpt.check_compatible(self.resume_from, model.config)  # before anything is written
        world = self.accelerator.num_processes
        if config.batch_size < world or config.batch_size % world:
            raise ConfigError(f"batch_size {config.batch_size} must be a multiple of the {world} processes")
        self.processor = processor
        self.vqgan = _load_vqgan(config.vqgan)  # encodes image-generation targets in build_batch
        self.mixture = Mixture(build_sources(config), task_quotas(config.tasks, config.batch_size))
        _check_identity_quotas(self.mixture.sources, self.mixture.quotas)
        self.batches = StepBatches(self.mixture, processor, self.vqgan, config.grad_accum,
                                   self.accelerator.process_index, world, config.max_steps)
        self._prefetched: tuple[int, Any] | None = None  # (next index, DataLoader iterator) with data_workers
        self.heads = build_heads(self.mixture.sources, model.config.d_model).to(self.accelerator.device)
        self.box_head = None  # grounding's box-mask head (training only), when the config weights that loss
        if config.box_mask_weight:
            self.box_head = torch.nn.Linear(model.config.d_model, 1).to(self.accelerator.device)
        warmup = None
        if config.stem_warmup_images and self.resume_from is None:  # a resumed run's stem is in its checkpoint
            warmup = self._warm_up_stem(model)
        if config.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        _freeze(model, config.freeze)
        self.optimizer, self.scheduler = _optimizer(model, config, self._head_parameters())
        self.ema = _ema(model, config.ema_decay)
        self.step = 0
        self.history: dict[str, Any] = {"losses": [], "lr": [], "eval": [], "stem_warmup": warmup}
        if self.resume_from is not None:
            self._restore(model, self.resume_from)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        if world == 1 and hasattr(self.unwrapped, "tied_gradients_in_place"):
            self.unwrapped.tied_gradients_in_place = True  # no gradient hooks to miss (modeling.py)

    def _warm_up_stem(self, model) -> dict[str, Any]:
        main = self.accelerator.is_main_process
        # every process runs the same seeded warm-up; DDP then broadcasts rank 0's weights anyway
        result = warm_up_stem(model, self.processor, self.config.stem_warmup_images, self.config.seed,
                              self.config.demo_max_objects, self.accelerator.device, show_progress=main,
                              subcells=self.config.stem_warmup_subcells, object_size=self.config.demo_object_size)
        if main:
            print(f"stem warm-up on {result['images']} generated scenes: held-out cell accuracy "
                  f"{result['object_cell_accuracy']:.3f} on objects (shape {result['shape_cell_accuracy']:.3f}, colour "
                  f"{result['colour_cell_accuracy']:.3f}), {result['background_cell_accuracy']:.3f} on background",
                  flush=True)
        return result

    # ---- state ----------------------------------------------------------------------------

    def _restore(self, model, path: Path) -> None:
        state = ckpt.load_state(path)
        ckpt.load_weights(model, path / "model.safetensors")
        self.heads.load_state_dict(state.get("heads", {}))
        if ("box_head" in state) != (self.box_head is not None):
            raise ConfigError(f"checkpoint {path} was trained {'with' if 'box_head' in state else 'without'} the "
                              "grounding box-mask loss: resume with the run's own 'box_mask_weight' (0 or not)")
        if self.box_head is not None:
            self.box_head.load_state_dict(state["box_head"])
        saved = [group.get("lr_scale", 1.0) for group in state["optimizer"]["param_groups"]]
        current = [group["lr_scale"] for group in self.optimizer.param_groups]
        if saved != current:
            raise ConfigError(f"checkpoint {path} was trained with LR groups scaled {saved}, this config makes "
                              f"{current}: resume with the run's own 'lr_scale' or start a new output_dir")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            ckpt.load_weights(self.ema, path / ckpt.EMA_FILE)
        ckpt.restore_rng_states(state["rng"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        self.history["losses"] = self.history["losses"][: self.step]
        self.history["lr"] = self.history["lr"][: self.step]
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at step {self.step}")

    def save(self) -> Path | None:
        """Write a resumable checkpoint of the current step (main process; others wait)."""
        path = None
        weights = self.accelerator.get_state_dict(self.model)  # collective: gathers FSDP shards
        if self.accelerator.is_main_process:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "heads": self.heads.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_states(),
                     "history": json.dumps(self.history)}
            if self.box_head is not None:
                state["box_head"] = self.box_head.state_dict()
            path = ckpt.save_checkpoint(self.output_dir, self.step, self.unwrapped, self.processor, state,
                                        self.config.to_yaml(), self.ema,
                                        self.config.keep_last, weights)
        self.accelerator.wait_for_everyone()
        return path

    def _train_mode(self) -> None:
        """Train mode, except BatchNorm on running statistics where asked or where `freeze` holds its
        weights (a frozen layer keeps its statistics too)."""
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                params = list(module.parameters())  # none when affine=False: not frozen, just weightless
                frozen = bool(params) and not any(p.requires_grad for p in params)
                if self.config.freeze_batchnorm or frozen:
                    module.eval()

    # ---- one step -------------------------------------------------------------------------

    def _micro_batches(self) -> list[tuple[dict[str, torch.Tensor], list[dict[str, Any]]]]:
        """This step's micro-batches on the device: built here, or taken from the DataLoader workers
        (`data_workers`), which are (re)started at this step's index whenever the run jumps."""
        first = self.step * self.config.grad_accum
        indices = range(first, first + self.config.grad_accum)
        if not self.config.data_workers:
            items = [self.batches[i] for i in indices]
        else:
            if self._prefetched is None or self._prefetched[0] != first:
                loader = torch.utils.data.DataLoader(
                    self.batches, batch_size=None, sampler=range(first, len(self.batches)), collate_fn=_as_is,
                    num_workers=min(self.config.data_workers, _usable_cpus()),
                    pin_memory=self.accelerator.device.type == "cuda")
                self._prefetched = (first, iter(loader))
            iterator = self._prefetched[1]
            items = [next(iterator) for _ in indices]
            self._prefetched = (indices.stop, iterator)
        device = self.accelerator.device
        return [({k: v.to(device, non_blocking=True) for k, v in batch.items()}, examples)
                for batch, examples in items]

    def _loss(self, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, summed per-task mean feature-head losses) of one micro-batch."""
        config = self.config
        if config.objective == "scst":
            loss, _, _ = objectives.scst(self.model, batch, examples, self.processor.tokenizer,
                                         config.scst_beams, config.scst_max_new_tokens)
            return loss, torch.zeros((), device=loss.device)
        loss, _, features, encoder_states = objectives.cross_entropy_and_features(self.model, batch,
                                                                                  config.label_smoothing)
        if self.box_head is not None:  # summed like the token loss, so normalised by the step's tokens too
            loss = loss + config.box_mask_weight * box_mask_loss(self.box_head, encoder_states,
                                                                 batch.get("pixel_values"), examples)
        return loss, objectives.head_losses(self.heads, features, examples)

    def train_step(self) -> float:
        """Forward/backward over the step's micro-batches and archs, then one optimizer update."""
        acc = self.accelerator
        batches = self._micro_batches()
        archs = step_archs(self.unwrapped.config, self.step)
        # the normaliser (target tokens in the whole global step) is known before any backward
        local_tokens = sum(int((b["labels"] != -100).sum()) for b, _ in batches) * len(archs)
        if self.config.objective == "scst":
            local_tokens = 1  # SCST sums over its own sampled tokens; normalise per process instead
        global_tokens = acc.reduce(torch.tensor(float(local_tokens), device=acc.device), reduction="sum").item()
        global_tokens = max(global_tokens, 1.0)  # a mixture of embedding tasks only has no target tokens
        total, head_total = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        passes = [(b, e, arch) for b, e in batches for arch in archs]
        for i, (batch, examples, arch) in enumerate(passes):
            if arch is not None:
                set_arch(self.unwrapped, arch)
            sync = nullcontext() if i == len(passes) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                loss_sum, head_loss = self._loss(batch, examples)
                # token losses: mean over the step's tokens; feature-head losses: mean over passes and processes
                acc.backward(loss_sum * acc.num_processes / global_tokens
                             + head_loss * self.config.head_loss_weight / len(passes))
            total += loss_sum.detach()
            head_total += head_loss.detach()
        if archs != [None]:
            set_arch(self.unwrapped, None)
        self._sync_head_gradients()
        loss = (acc.reduce(total, reduction="sum").item() / global_tokens
                + acc.reduce(head_total, reduction="mean").item() * self.config.head_loss_weight / len(passes))
        if not math.isfinite(loss):
            last = ckpt.list_checkpoints(self.output_dir)
            raise TrainingError(f"loss is {loss} at step {self.step}; stopped without updating. Last good "
                                f"checkpoint: {last[-1] if last else 'none written yet'} (lower lr or check the data)")
        if self.config.clip_norm:
            self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.unwrapped)
        return loss

    def _head_parameters(self) -> list[torch.nn.Parameter]:
        """The training-only heads' parameters (feature heads, box-mask head), optimised with the model."""
        box = list(self.box_head.parameters()) if self.box_head is not None else []
        return [*self.heads.parameters(), *box]

    def _sync_head_gradients(self) -> None:
        """Average the heads' gradients over processes (they sit outside the DDP-wrapped model)."""
        if self.accelerator.num_processes > 1:
            for param in self._head_parameters():
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    def _clip_gradients(self) -> None:
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            acc.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)  # sharded gradients
            return
        acc.unscale_gradients()
        params = [*self.model.parameters(), *self._head_parameters()]
        torch.nn.utils.clip_grad_norm_(params, self.config.clip_norm, foreach=True)

    # ---- evaluation -----------------------------------------------------------------------

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics per task on held-out examples (main process); the model it scores is the EMA when set."""
        results: dict[str, dict[str, float]] = {}
        self.image_signal = None
        if self.config.eval_examples and self.accelerator.is_main_process:
            model = self.ema.module if self.ema is not None else self.unwrapped
            was_training = model.training
            model.eval()
            for task in self.config.tasks:
                examples, spec = eval_examples(self.config, task)
                if examples:
                    results[task] = evaluate_model(model, self.processor, spec, examples, self.config.eval_batch_size)
                    if self.image_signal is None:
                        self.image_signal = encoder_image_signal(model, self.processor, _loadable(examples[:32]))
            if was_training:
                self._train_mode()
        self.accelerator.wait_for_everyone()
        return results

    # ---- the loop -------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        config, acc = self.config, self.accelerator
        main = acc.is_main_process
        start = time.perf_counter()
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / ckpt.CONFIG_FILE).write_text(config.to_yaml())
        if not self.history["eval"]:
            self.history["eval"].append({"step": 0, "metrics": self.evaluate(), "image_signal": self.image_signal})
        writer = _tensorboard(self.output_dir) if main else None
        samples = config.global_batch
        self._train_mode()
        bar = tqdm(range(self.step, config.max_steps), desc="train", unit="step", initial=self.step,
                   total=config.max_steps, disable=not main)
        tick = time.perf_counter()
        for _ in bar:
            lr = _base_lr(self.optimizer)
            loss = self.train_step()
            self.step += 1
            now = time.perf_counter()
            rate, tick = samples / max(now - tick, 1e-9), now
            self.history["losses"].append(loss)
            self.history["lr"].append(lr)
            if main:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                writer.add_scalar("train/loss", loss, self.step)
                writer.add_scalar("train/lr", lr, self.step)
                writer.add_scalar("train/samples_per_s", rate, self.step)
                if self.step % config.log_every == 0 and not bar.disable and not os.isatty(2):
                    print(f"step {self.step}/{config.max_steps} loss {loss:.4f} lr {lr:.2e} samples/s {rate:.1f}",
                          flush=True)
            if config.eval_every and self.step % config.eval_every == 0 and self.step < config.max_steps:
                self._record_eval(writer)
                self._train_mode()
            if config.save_every and self.step % config.save_every == 0:
                self.save()
        bar.close()
        self._prefetched = None  # ends the data workers
        if self.history["eval"][-1]["step"] != self.step:
            self._record_eval(writer)
        if not (config.save_every and self.step % config.save_every == 0):
            self.save()
        if main:
            self._export()
            writer.close()
        return self._result(time.perf_counter() - start)

    def _record_eval(self, writer) -> None:
        metrics = self.evaluate()
        self.history["eval"].append({"step": self.step, "metrics": metrics, "image_signal": self.image_signal})
        if writer is not None:
            if self.image_signal is not None:
                writer.add_scalar("eval/encoder_image_signal", self.image_signal, self.step)
            for task, values in metrics.items():
                for name, value in values.items():
                    writer.add_scalar(f"eval/{task}/{name}", value, self.step)

    def _export(self) -> None:
        """The final model (EMA when enabled) as a servable save_pretrained directory, plus the report."""
        model = self.ema.module if self.ema is not None else self.unwrapped

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            if self.vqgan is not None:  # <model dir>/vqgan: the pipeline finds it there (image generation)
                from ofa_ufo.tasks.image_gen import VQGAN_SUBDIR

                self.vqgan.save_pretrained(tmp / VQGAN_SUBDIR)
            if len(self.heads):  # the embedding tasks' closed sets: pipe(..., identify=True)
                save_identities(tmp, {task: IdentityClassifier.from_head(head) for task, head in self.heads.items()})

        ckpt.export_into(self.output_dir, write)
        before, after = self.history["eval"][0]["metrics"], self.history["eval"][-1]["metrics"]
        start = "start" if Path(self.config.model).is_dir() else "untrained"
        if self.history.get("stem_warmup"):
            start += " (stem warmed up)"
        table = format_metric_table(before, after, start)
        report = {"steps": self.step, "metrics_untrained": before, "metrics_trained": after,
                  "stem_warmup": self.history.get("stem_warmup"),
                  "eval": self.history["eval"], "losses": self.history["losses"], "lr": self.history["lr"]}
        (self.output_dir / "metrics.json").write_text(json.dumps(report, indent=1))
        plot_history(self.history, self.output_dir / "training.png")
        print(table)
        signals = [entry.get("image_signal") for entry in (self.history["eval"][0], self.history["eval"][-1])]
        if None not in signals:
            print(f"encoder image signal {signals[0]:.3f} -> {signals[1]:.3f} (share of the encoder output at image "
                  "positions that differs between images; near 0: answers come from the prompt alone)")
        print(f"model, metrics.json and training.png written to {self.output_dir}")
        if self.config.show_photos:
            show_real_photos(self.output_dir, list(self.config.tasks))

    def _result(self, seconds: float) -> TrainResult:
        evals = self.history["eval"]
        return TrainResult(self.output_dir, list(self.history["losses"]), evals[0]["metrics"], evals[-1]["metrics"],
                           seconds)


def _tensorboard(output_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(output_dir / "tensorboard"))


def train(config: TrainConfig, resume: str | None = "auto") -> TrainResult:
    """Train `config` (resuming from its newest checkpoint unless `resume="never"` or a path)."""
    return Trainer(config, resume=resume).fit()
