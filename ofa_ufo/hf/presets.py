"""Named architectures (`ofa_ufo_tiny` ... `ofa_ufo_huge`): OFA's five sizes as config data.

`create_model` builds a randomly initialised model offline; the vocabulary layout (text ids,
codes, bins) is read from the tokenizer the model will be used with, by default the one that
ships with the package.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import torch

from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.hf.image_processing import OFAUFOImageProcessor
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.hf.tokenization import build_tokenizer
from ofa_ufo.tasks import list_tasks

# Sizes from OFA's `register_model_architecture` presets (reference/ofa.md, section 2.1).
PRESETS: dict[str, dict[str, Any]] = {
    "ofa_ufo_tiny": dict(d_model=256, layers=(4, 4), heads=4, resnet="resnet50"),
    "ofa_ufo_medium": dict(d_model=512, layers=(4, 4), heads=8, resnet="resnet101"),
    "ofa_ufo_base": dict(d_model=768, layers=(6, 6), heads=12, resnet="resnet101"),
    "ofa_ufo_large": dict(d_model=1024, layers=(12, 12), heads=16, resnet="resnet152"),
    "ofa_ufo_huge": dict(d_model=1280, layers=(24, 12), heads=16, resnet="resnet152"),
}


def _ufo(base: str, blocks: int, dim: int) -> dict[str, Any]:
    """An OFA size with a UFO task-MoE supernet of `blocks` ViT blocks (head dim 64, MLP ratio 4) and
    UFO's chip-level elastic ranges (heads -2..0, MLP ratio 3..4, depth -2..0)."""
    heads = dim // 64
    supernet = dict(
        supernet_layers=blocks, supernet_dim=dim, supernet_heads=heads, supernet_head_dim=64, supernet_mlp_ratio=4.0,
        supernet_elastic_heads=[heads - 2, heads - 1, heads], supernet_elastic_mlp_ratios=[3.0, 3.5, 4.0],
        supernet_elastic_depths=[blocks - 2, blocks - 1, blocks],
    )
    return {**PRESETS[base], "supernet": supernet}


PRESETS.update({
    "ofa_ufo_tiny_ufo": _ufo("ofa_ufo_tiny", 4, 256),
    "ofa_ufo_base_ufo": _ufo("ofa_ufo_base", 6, 768),
})


def list_models() -> list[str]:
    """Names accepted by `create_model`, smallest first."""
    return list(PRESETS)


def _preset(name: str) -> dict[str, Any]:
    base = name.split(".", 1)[0]  # "ofa_ufo_base.pretrain_demo" -> architecture "ofa_ufo_base"
    if base not in PRESETS:
        raise ValueError(f"Unknown model {name!r}. Available: {', '.join(PRESETS)}")
    return PRESETS[base]


@lru_cache(maxsize=1)
def _default_tokenizer():
    return build_tokenizer()


def vocab_fields(tokenizer=None) -> dict[str, int]:
    """Config fields that describe a tokenizer's unified vocabulary layout."""
    tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
    return dict(
        vocab_size=len(tokenizer), code_offset=tokenizer.code_offset, num_codes=tokenizer.num_codes,
        bin_offset=tokenizer.bin_offset, num_bins=tokenizer.num_bins,
    )


def create_config(name: str, tokenizer=None, **overrides: Any) -> OFAUFOConfig:
    """Config of preset `name`, its task vocabulary the tasks registered now; keyword overrides win
    (unknown fields raise)."""
    preset = _preset(name)
    dim, heads = preset["d_model"], preset["heads"]
    fields: dict[str, Any] = dict(
        d_model=dim, encoder_layers=preset["layers"][0], decoder_layers=preset["layers"][1],
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=4 * dim, decoder_ffn_dim=4 * dim,
        vision_config={"resnet_type": preset["resnet"], **preset.get("supernet", {}), "task_names": list_tasks()},
    )
    fields.update(vocab_fields(tokenizer))
    vision_overrides = overrides.pop("vision_config", None) or {}
    fields["vision_config"].update(vision_overrides)
    fields.update(overrides)
    return OFAUFOConfig(**fields)


def create_model(name: str, tokenizer=None, **overrides: Any):
    """Randomly initialised `OFAUFOForConditionalGeneration` of preset `name` (no download)."""
    return OFAUFOForConditionalGeneration(create_config(name, tokenizer, **overrides))


def create_processor(name: str = "ofa_ufo_base", **overrides: Any):
    """Processor (default tokenizer + image processor) matching preset `name`; offline."""
    config = create_config(name, **overrides)
    tokenizer = copy.deepcopy(_default_tokenizer())  # callers may change settings on their copy
    tokenizer.model_max_length = config.max_position_embeddings
    image_processor = OFAUFOImageProcessor(size=config.image_size)
    return OFAUFOProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        box_mode=config.box_mode, max_image_size=config.max_image_size,
    )


def preset_table() -> str:
    """Markdown table of every preset with its parameter count, computed on the meta device."""
    ofa_vocab = dict(vocab_size=59457, code_offset=50265, bin_offset=58457)
    rows = [
        "| preset | d_model | layers (enc/dec) | heads | ResNet | UFO supernet | params (default vocab) | params (OFA vocab 59,457) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            counts = [sum(p.numel() for p in create_model(name, **vocab).parameters()) for vocab in ({}, ofa_vocab)]
        enc, dec = preset["layers"]
        ufo = preset.get("supernet")
        supernet = f"{ufo['supernet_layers']} x d{ufo['supernet_dim']}" if ufo else "-"
        rows.append(
            f"| `{name}` | {preset['d_model']} | {enc}/{dec} | {preset['heads']} | {preset['resnet']} | {supernet} "
            f"| {counts[0] / 1e6:.1f}M | {counts[1] / 1e6:.1f}M |"
        )
    return "\n".join(rows)
