"""VQGAN: the convolutional autoencoder of taming-transformers with a discrete bottleneck.

Image (B, 3, H, W) in [-1, 1] -> `Encoder` (ResNet blocks, stride-2 downsampling per level but the
last, attention at the configured resolutions) -> 1x1 `quant_conv` -> quantiser (codes on an
(H/f, W/f) grid) -> codebook vectors -> 1x1 `post_quant_conv` -> `Decoder` (the mirror image) ->
image. f = 2 ** (len(ch_mult) - 1).

Module and parameter names follow taming's `modules/diffusionmodules/model.py` (`down.0.block.1.norm1`,
`mid.attn_1.q`, `up.3.upsample.conv`, `nin_shortcut`, ...) so that its checkpoints load after dropping
the loss/discriminator weights; the one rename is Gumbel's codebook, `quantize.embed` ->
`quantize.embedding` (both quantisers keep their codebook under one name here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class VQGANArch(Protocol):
    """The architecture fields `Encoder` / `Decoder` read (a `VQGANConfig` provides them)."""

    in_channels: int
    out_channels: int
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    dropout: float


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), computed as taming does: `F.silu` differs in the last bits, and bit-identical
    activations keep codes identical to taming's even where two codes are nearly tied."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """taming's `Normalize`: 32 groups, eps 1e-6."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice (dropout before the second conv), plus a 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections and a residual.

    Written with two `bmm`s in taming's order rather than `F.scaled_dot_product_attention`, whose
    kernels round differently (about 1e-6 per block); the (H*W)^2 weights fit easily at VQGAN sizes.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).flatten(2).transpose(1, 2)  # (B, H*W, C)
        k, v = self.k(y).flatten(2), self.v(y).flatten(2)  # (B, C, H*W)
        weights = (torch.bmm(q, k) * c**-0.5).softmax(-1)  # (B, H*W queries, H*W keys)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)  # (B, C, H*W queries) -> (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: `num_blocks` ResNet blocks, each followed by attention
    when the level's resolution is an attention resolution."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[i], out_channels, dropout) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class DownLevel(Level):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float,
                 downsample: bool):
        super().__init__(in_channels, out_channels, num_blocks, attention, dropout)
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(Level):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float,
                 upsample: bool):
        super().__init__(in_channels, out_channels, num_blocks, attention, dropout)
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_blocks(x)
        return x if self.upsample is None else self.upsample(x)


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def level_resolutions(arch: VQGANArch) -> list[int]:
    """Nominal feature-map side of each level, from `resolution` (decides where attention goes)."""
    return [arch.resolution // 2**i for i in range(len(arch.ch_mult))]


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, arch: VQGANArch):
        super().__init__()
        widths = [arch.ch * m for m in arch.ch_mult]
        self.conv_in = conv3x3(arch.in_channels, arch.ch)
        last = len(widths) - 1
        self.down = nn.ModuleList(
            DownLevel(([arch.ch] + widths)[i], widths[i], arch.num_res_blocks, res in arch.attn_resolutions,
                      arch.dropout, downsample=i != last)
            for i, res in enumerate(level_resolutions(arch))
        )
        self.mid = MidBlock(widths[-1], arch.dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = conv3x3(widths[-1], arch.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h*f, w*f); `up[i]` mirrors `down[i]` (run from the last)."""

    def __init__(self, arch: VQGANArch):
        super().__init__()
        widths = [arch.ch * m for m in arch.ch_mult]
        resolutions = level_resolutions(arch)
        self.conv_in = conv3x3(arch.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1], arch.dropout)
        self.up = nn.ModuleList(
            UpLevel((widths + [widths[-1]])[i + 1], widths[i], arch.num_res_blocks + 1,
                    resolutions[i] in arch.attn_resolutions, arch.dropout, upsample=i != 0)
            for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = conv3x3(widths[0], arch.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class Quantizer(nn.Module):
    """Shared codebook lookup; subclasses choose codes from the encoder features."""

    embedding: nn.Embedding

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) integer codes -> (B, embed_dim, h, w) codebook vectors (contiguous, as taming's VQ)."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class VectorQuantize(Quantizer):
    """Nearest codebook entry (VQ-VAE), straight-through gradient, loss = codebook + beta * commitment.

    taming's `VectorQuantizer2` defaults to `legacy=True`, which puts beta on the codebook term
    instead; the loss *value* is the same (both terms are equal in the forward pass), only the
    split of its gradient between encoder and codebook differs.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) features -> (B, h, w) index of the nearest codebook vector (squared L2)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        table = self.embedding.weight  # (n_embed, D)
        distance = flat.pow(2).sum(1, keepdim=True) + table.pow(2).sum(1) - 2 * flat @ table.t()  # (B*h*w, n_embed)
        return distance.argmin(1).view(b, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = self.codes(z)
        z_q = self.lookup(codes)
        loss = (z_q - z.detach()).pow(2).mean() + self.beta * (z_q.detach() - z).pow(2).mean()
        if self.training:  # straight-through; in eval the exact codebook vectors (z + (z_q - z) rounds)
            z_q = z + (z_q - z).detach()
        return z_q, loss, codes


class GumbelQuantize(Quantizer):
    """Logits over the codebook from a 1x1 conv; codes are their argmax.

    Training samples a hard one-hot with `F.gumbel_softmax` (straight-through, `temperature`) and adds
    `kl_weight` * KL(softmax(logits) || uniform). Evaluation is deterministic (the argmax). taming's
    `GumbelQuantize` adds Gumbel noise in eval mode too, so its codes are a random draw around ours.
    """

    def __init__(self, in_channels: int, n_embed: int, embed_dim: int, kl_weight: float = 5e-4,
                 temperature: float = 1.0):
        super().__init__()
        self.kl_weight = kl_weight
        self.temperature = temperature
        self.proj = nn.Conv2d(in_channels, n_embed, 1)
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B, h, w) most likely code."""
        return self.proj(z).argmax(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors left in the channels-last memory order of taming's one-hot einsum: the decoder's
        convolutions then pick the same kernels and round exactly as taming's do."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(z)  # (B, n_embed, h, w)
        probs = logits.softmax(1)
        kl = (probs * torch.log(probs * logits.shape[1] + 1e-10)).sum(1).mean()
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=True)  # (B, n_embed, h, w)
            z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embedding.weight)
            codes = one_hot.argmax(1)
        else:
            codes = logits.argmax(1)
            z_q = self.lookup(codes)
        return z_q, self.kl_weight * kl, codes
