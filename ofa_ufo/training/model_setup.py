"""The model a run trains: a preset built from scratch or a directory to fine-tune, the VQGAN that
encodes image-generation targets, the parameters `freeze` holds, train mode, and the accelerator."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.modeling_vqgan import VQGANModel
from ofa_ufo.hf.presets import create_model, create_processor, list_models
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.training.config import ConfigError, TrainConfig


def build_model(config: TrainConfig) -> tuple[OFAUFOForConditionalGeneration, OFAUFOProcessor]:
    """(model, processor): a preset built from scratch, or a save_pretrained directory to fine-tune."""
    if Path(config.model).is_dir():
        model = OFAUFOForConditionalGeneration.from_pretrained(config.model, **config.model_overrides)
        return model, OFAUFOProcessor.from_pretrained(config.model)
    if config.model.split(".", 1)[0] not in list_models():
        raise ConfigError(f"model {config.model!r} is neither a preset ({', '.join(list_models())}) "
                          "nor a save_pretrained directory")
    torch.manual_seed(config.seed)
    model = create_model(config.model, **config.model_overrides)
    image_size = model.config.image_size
    return model, create_processor(config.model, image_size=image_size)


def load_vqgan(path: str) -> VQGANModel | None:
    """The `vqgan` config field's model (CPU, eval), or None when the field is empty."""
    if not path:
        return None
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"field 'vqgan': {path} is not a VQGANModel.save_pretrained directory (no config.json)")
    return VQGANModel.from_pretrained(path).eval()


def make_accelerator(config: TrainConfig) -> Accelerator:
    """CPU or one device per process; bf16 autocast on a GPU unless `precision` says otherwise."""
    gpu = torch.cuda.is_available()
    precision = {"auto": "bf16" if gpu else "no", "fp32": "no", "bf16": "bf16"}[config.precision]
    # decoder image-position tables serve image generation only, so text steps leave them unused
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=not gpu, mixed_precision=precision, kwargs_handlers=[ddp])


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
