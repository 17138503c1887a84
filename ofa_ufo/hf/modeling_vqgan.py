"""Hugging Face face of the VQGAN image tokenizer: `VQGANConfig`, `VQGANModel` and named presets.

OFA turns images into discrete tokens (text-to-image targets, image infilling) with taming-transformers'
"VQGAN OpenImages (f=8), 8192 codes, Gumbel quantisation": a 256x256 image becomes 32x32 = 1024 codes.

    model = create_vqgan("vqgan_tiny")
    codes = model.encode(pixels)       # (B, 3, H, W) in [-1, 1] -> (B, H/f, W/f) long
    images = model.decode(codes)       # -> (B, 3, H, W) in [-1, 1]

Official taming checkpoints convert with `python -m ofa_ufo.converters.taming`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ofa_ufo.hf.configuration import reject_unknown_fields
from ofa_ufo.models.vqgan import Decoder, Encoder, GumbelQuantize, VectorQuantize, level_resolutions

QUANTIZERS = ("gumbel", "vq")


@strict(accept_kwargs=True)
class VQGANConfig(PreTrainedConfig):
    """Architecture of a VQGAN (taming's `ddconfig` plus the quantiser); defaults are OFA's f=8, 8192-code
    Gumbel model. Field names follow taming's (`out_ch` is `out_channels` here)."""

    model_type = "ofa-ufo-vqgan"

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: list[int] | tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: list[int] | tuple[int, ...] = (32,)
    resolution: int = 256  # nominal input side: places attention, and is the size presets expect
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 8192
    quantizer: str = "gumbel"  # "gumbel" (GumbelVQ) or "vq" (VQModel's nearest-neighbour quantiser)
    dropout: float = 0.0
    beta: float = 0.25  # "vq": commitment weight
    kl_weight: float = 1e-8  # "gumbel": weight of KL(code distribution || uniform)
    temperature: float = 1.0  # "gumbel": Gumbel-softmax temperature while training

    def __post_init__(self, **kwargs):
        self.ch_mult = list(self.ch_mult)
        self.attn_resolutions = list(self.attn_resolutions)
        reject_unknown_fields(self, kwargs)
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        """Catch settings that would only fail deep inside torch, or silently do nothing."""
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if not self.ch_mult or min(self.ch_mult) < 1 or self.num_res_blocks < 1 or self.n_embed < 1:
            raise ValueError(
                f"need a non-empty ch_mult of positive ints, num_res_blocks >= 1 and n_embed >= 1; got "
                f"ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}, n_embed={self.n_embed}"
            )
        widths = sorted({self.ch * m for m in self.ch_mult})
        if any(width % 32 for width in widths):
            raise ValueError(f"every level width ch * ch_mult = {widths} must be a multiple of 32 (GroupNorm groups)")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution={self.resolution} is not a multiple of the downsampling factor "
                             f"{self.downsample_factor}")
        levels = level_resolutions(self)
        if not set(self.attn_resolutions) <= set(levels):
            raise ValueError(f"attn_resolutions={self.attn_resolutions} must be level resolutions {levels} "
                             f"(resolution {self.resolution} halved per level)")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.ch_mult) - 1)


# Named architectures. "vqgan_f8_8192_gumbel" is taming's vqgan_gumbel_f8 (OpenImages), the tokenizer OFA
# uses (reference/ofa.md 4.2); "vqgan_tiny" (1.1M parameters, also f=8) is for tests; "vqgan_demo" is the
# tiny shape with 256 nearest-neighbour codes, the one the demo text-to-image run trains on 2 CPU cores
# (python -m ofa_ufo.training.vqgan_train, docs/vqgan.md).
_TINY = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=64, z_channels=32,
             embed_dim=32)
PRESETS: dict[str, dict[str, Any]] = {
    "vqgan_f8_8192_gumbel": {},
    "vqgan_tiny": dict(_TINY, n_embed=64),
    "vqgan_demo": dict(_TINY, n_embed=256, quantizer="vq"),
}


def list_vqgans() -> list[str]:
    """Names accepted by `create_vqgan`."""
    return list(PRESETS)


def create_vqgan_config(name: str, **overrides: Any) -> VQGANConfig:
    """Config of preset `name` ("arch" or "arch.tag"); keyword overrides win, unknown fields raise."""
    arch = name.split(".", 1)[0]
    if arch not in PRESETS:
        raise ValueError(f"Unknown VQGAN {name!r}. Available: {', '.join(PRESETS)}")
    return VQGANConfig(**{**PRESETS[arch], **overrides})


def create_vqgan(name: str, **overrides: Any) -> VQGANModel:
    """A randomly initialised VQGAN of preset `name` (offline; load weights with `from_pretrained`)."""
    return VQGANModel(create_vqgan_config(name, **overrides))


@dataclass
class VQGANOutput(ModelOutput):
    """reconstruction (B, C, H, W), unclamped; quantizer_loss (scalar); codes (B, H/f, W/f)."""

    reconstruction: torch.Tensor | None = None
    quantizer_loss: torch.Tensor | None = None
    codes: torch.Tensor | None = None


class VQGANModel(PreTrainedModel):
    """Image <-> discrete codes. Pixels are (B, C, H, W) floats in [-1, 1] with H and W multiples of
    `downsample_factor`; codes are (B, H/f, W/f) integers in [0, n_embed)."""

    config_class = VQGANConfig
    config: VQGANConfig
    base_model_prefix = "vqgan"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ResnetBlock", "AttnBlock"]

    def __init__(self, config: VQGANConfig):
        super().__init__(config)
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        if config.quantizer == "gumbel":
            self.quantize = GumbelQuantize(config.embed_dim, config.n_embed, config.embed_dim,
                                           kl_weight=config.kl_weight, temperature=config.temperature)
        else:
            self.quantize = VectorQuantize(config.n_embed, config.embed_dim, beta=config.beta)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """taming's init: PyTorch's defaults for convs and norms; the codebook U(-1/n, 1/n) for "vq"
        (VectorQuantizer2), N(0, 1) for "gumbel" (nn.Embedding's default)."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.weight[0].numel())
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if self.config.quantizer == "vq":
                init.uniform_(module.weight, -1 / self.config.n_embed, 1 / self.config.n_embed)
            else:
                init.normal_(module.weight, 0.0, 1.0)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def code_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the code grid for an image of `height` x `width` pixels; ValueError if not divisible."""
        f = self.downsample_factor
        if height % f or width % f:
            near = [max(f, round(side / f) * f) for side in (height, width)]
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the VQGAN downsampling factor {f}; "
                f"resize it (e.g. to {near[0]}x{near[1]})"
            )
        return height // f, width // f

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        channels = self.config.in_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels or not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor (B, {channels}, H, W) in [-1, 1], got "
                             f"{pixel_values.dtype} of shape {tuple(pixel_values.shape)}")
        self.code_grid(*pixel_values.shape[-2:])

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes, or (B, h*h) row-major for a square grid -> (B, h, w); ValueError otherwise."""
        if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.ndim == 2 and codes.shape[1] > 0 and math.isqrt(codes.shape[1]) ** 2 == codes.shape[1]:
            side = math.isqrt(codes.shape[1])
            codes = codes.reshape(codes.shape[0], side, side)
        if codes.ndim != 3 or codes.numel() == 0:
            raise ValueError(
                f"codes must have shape (B, h, w), or (B, h*h) for a square grid; got {tuple(codes.shape)}"
            )
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.config.n_embed:
            raise ValueError(
                f"codes must lie in [0, {self.config.n_embed}) (the codebook size n_embed), got values in "
                f"[{low}, {high}] (vocabulary token ids? subtract the code offset first)"
            )
        return codes.long()

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encoder features before the quantiser, (B, embed_dim, h, w)."""
        self._check_pixels(pixel_values)
        return self.quant_conv(self.encoder(pixel_values))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels in [-1, 1] -> (B, H/f, W/f) long codes (deterministic)."""
        return self.quantize.codes(self.encode_features(pixel_values))

    def decode(self, codes: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B, h, w) codes (or (B, h*h) row-major) -> (B, out_channels, h*f, w*f) pixels, clamped to [-1, 1]."""
        z_q = self.quantize.lookup(self._check_codes(codes))  # (B, embed_dim, h, w)
        pixels = self.decoder(self.post_quant_conv(z_q))
        return pixels.clamp(-1.0, 1.0) if clamp else pixels

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None) -> VQGANOutput | tuple:
        """Autoencode for training: the reconstruction (unclamped) and the quantiser's loss; the pixel,
        perceptual and adversarial losses belong to the training code."""
        z_q, loss, codes = self.quantize(self.encode_features(pixel_values))
        reconstruction = self.decoder(self.post_quant_conv(z_q))
        output = VQGANOutput(reconstruction=reconstruction, quantizer_loss=loss, codes=codes)
        return output if return_dict is not False else output.to_tuple()
