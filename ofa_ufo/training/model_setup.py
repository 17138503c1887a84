"""The model a run trains: a preset built from scratch or a directory to fine-tune, the VQGAN that
encodes image-generation targets, the parameters `freeze` holds, train mode, and the accelerator."""

from __future__ import annotations

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
from ofa_ufo.training.config import ConfigError, TrainConfig


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
