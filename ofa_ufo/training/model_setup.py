"""The model a run trains: a preset built from scratch or a directory to fine-tune, the VQGAN that
encodes image-generation targets, the parameters `freeze` holds, train mode, and the accelerator."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState

from ofa_ufo.core.hardware import PrecisionChoice, resolve_precision
from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.modeling_vqgan import VQGANModel
from ofa_ufo.hf.presets import create_model, create_processor, list_models
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.layers.moe import TaskMoEFFN
from ofa_ufo.models.growth import GrowthError, grow_model, grow_state
from ofa_ufo.tasks import get_task
from ofa_ufo.training import checkpoint as ckpt
from ofa_ufo.training.config import ConfigError, TrainConfig, load_config


def build_model(config: TrainConfig, head_overrides: dict[str, Any] | None = None
                ) -> tuple[OFAUFOForConditionalGeneration, OFAUFOProcessor]:
    """(model, processor): a preset built from scratch, or a save_pretrained directory to fine-tune.
    `head_overrides`: model config fields the run's tasks need (e.g. `dense_head`), applied where the
    config's own `model_overrides` and a saved model's config leave them unset."""
    overrides = {**(head_overrides or {}), **config.model_overrides}
    if Path(config.model).is_dir():
        saved = OFAUFOConfig.from_pretrained(config.model)
        overrides = {k: v for k, v in overrides.items()
                     if k in config.model_overrides or getattr(saved, k, None) is None}
        model = OFAUFOForConditionalGeneration.from_pretrained(config.model, **overrides)
        return model, OFAUFOProcessor.from_pretrained(config.model)
    if config.model.split(".", 1)[0] not in list_models():
        raise ConfigError(f"model {config.model!r} is neither a preset ({', '.join(list_models())}) "
                          "nor a save_pretrained directory")
    torch.manual_seed(config.seed)
    model = create_model(config.model, **overrides)
    image_size = model.config.image_size
    return model, create_processor(config.model, image_size=image_size)


def load_vqgan(path: str) -> VQGANModel | None:
    """The `vqgan` config field's model (CPU, eval), or None when the field is empty."""
    if not path:
        return None
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"field 'vqgan': {path} is not a VQGANModel.save_pretrained directory (no config.json)")
    return VQGANModel.from_pretrained(path).eval()


def choose_precision(config: TrainConfig) -> PrecisionChoice:
    """What `precision` means for this run: auto is bf16 autocast where the device is fast at it (a CUDA GPU
    with bf16, a CPU with AMX / AVX512-BF16: `ofa_ufo.core.hardware`), fp32 elsewhere."""
    return resolve_precision(config.precision, "cuda" if torch.cuda.is_available() else "cpu")


def make_accelerator(config: TrainConfig, precision: PrecisionChoice) -> Accelerator:
    """CPU or one device per process; bf16 autocast (fp32 weights and optimizer state) when `precision` is bf16."""
    gpu = torch.cuda.is_available()
    # decoder image-position tables serve image generation only, so text steps leave them unused
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    mixed = "bf16" if precision.precision == "bf16" else "no"
    _forget_other_precision(mixed)
    return Accelerator(cpu=not gpu, mixed_precision=mixed, kwargs_handlers=[ddp])


def _forget_other_precision(mixed: str) -> None:
    """accelerate keeps one state per process and refuses an Accelerator with another mixed precision than
    the first one's (a second run in one process: a notebook, a test); precision is a run's own setting
    here, so that state is dropped (the process group, in `PartialState`, stays)."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state()


def check_prefixes(model: torch.nn.Module, prefixes: list[str], field: str) -> None:
    """ConfigError naming the prefixes of `field` that match no trainable parameter name."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unmatched = [prefix for prefix in prefixes if not any(n.startswith(prefix) for n in names)]
    if unmatched:
        tops = sorted({".".join(n.split(".")[:3]) for n in names})
        raise ConfigError(f"field {field!r}: prefix(es) {unmatched} match no trainable parameter; "
                          f"parameter names start with {tops}")


def freeze(model: torch.nn.Module, config: TrainConfig) -> None:
    """Stop training the token embeddings (`freeze_embeddings`) and the parameters under `freeze` prefixes."""
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    check_prefixes(model, config.freeze, "freeze")
    for name, param in model.named_parameters():
        if any(name.startswith(prefix) for prefix in config.freeze):
            param.requires_grad_(False)


def task_experts_step(model: torch.nn.Module, config: TrainConfig) -> int:
    """The step at which a run's task experts start (`task_experts_from`; 0: they train from the start)."""
    if not config.task_experts_from:
        return 0
    if not any(isinstance(module, TaskMoEFFN) for module in model.modules()):
        raise ConfigError(f"field 'task_experts_from' ({config.task_experts_from}) needs a routed supernet with task "
                          f"experts; model {config.model!r} has none (set it to 0)")
    return round(config.task_experts_from * config.max_steps)


def set_task_experts(model: torch.nn.Module, start: bool) -> None:
    """Lock every task of the model's task-routed FFNs on the shared expert, or start their experts."""
    for module in model.modules():
        if isinstance(module, TaskMoEFFN) and start:
            module.start_experts()
        elif isinstance(module, TaskMoEFFN):
            module.lock_to_shared()


def set_train_mode(model: torch.nn.Module, freeze_batchnorm: bool) -> None:
    """Train mode, except BatchNorm on running statistics where asked or where `freeze` holds its
    weights (a frozen layer keeps its statistics too)."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())  # none when affine=False: not frozen, just weightless
            frozen = bool(params) and not any(p.requires_grad for p in params)
            if freeze_batchnorm or frozen:
                module.eval()


def grow_from_small(model: OFAUFOForConditionalGeneration, config: TrainConfig,
                    train_small: Callable[[TrainConfig], Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the `grow_from` model into `model` (in place, `ofa_ufo.models.growth`): a save_pretrained
    directory as it is, or a config name (with `grow_overrides`) whose finished model in its output_dir is
    reused and is otherwise trained first with `train_small` (same threads and precision, no photo
    display). Returns what the report records (the small model's directory and its trained metrics, when
    its run wrote them) and the trainer state of the small run's newest checkpoint ({} without one), whose
    training-only heads (the box-mask head) `grow_heads` grows with the model."""
    if Path(config.model).is_dir():
        raise ConfigError(f"field 'grow_from' grows into a preset built from scratch, but model {config.model!r} is "
                          "a saved model to fine-tune: set model to a preset name or grow_from=''")
    source = Path(config.grow_from)
    if (source / "config.json").is_file():
        small_dir = source
    else:
        small_config = replace(load_config(config.grow_from, config.grow_overrides), show_photos=False,
                               num_threads=config.num_threads, precision=config.precision)
        small_dir = Path(small_config.output_dir)
        if (small_dir / "model.safetensors").is_file() and (small_dir / "metrics.json").is_file():
            print(f"growing {config.model} from the finished run in {small_dir} (delete it to train "
                  f"{small_config.model} again)", flush=True)
        else:
            print(f"grow_from {config.grow_from}: training {small_config.model} first ({small_dir}), then growing "
                  f"it into {config.model}", flush=True)
            train_small(small_config)
    small = OFAUFOForConditionalGeneration.from_pretrained(small_dir)
    try:
        grow_model(small, model, config.seed)
    except GrowthError as error:
        raise ConfigError(f"field 'grow_from': {small_dir} ({small.config.d_model} wide) cannot grow into "
                          f"{config.model}: {error}") from None
    metrics_file = small_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()).get("metrics_trained") if metrics_file.is_file() else None
    checkpoints = ckpt.list_checkpoints(small_dir)
    state = ckpt.load_state(checkpoints[-1]) if checkpoints else {}
    return {"model": str(small_dir), "width_factor": model.config.d_model // small.config.d_model,
            "metrics": metrics}, state


def grow_heads(heads: torch.nn.ModuleDict, small_state: dict[str, Any], seed: int) -> list[str]:
    """Grow the training-only heads (task -> head, e.g. grounding's box-mask head) a small run's trainer state
    holds into this run's `heads`; returns the tasks whose head was grown (the others start fresh)."""
    generator = torch.Generator().manual_seed(seed + 1)
    grown = []
    for task, head in heads.items():
        saved = small_state.get(get_task(task).auxiliary.state_key)
        if saved is not None:
            grow_state(saved, head, generator)
            grown.append(task)
    return grown
