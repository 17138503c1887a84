"""ResNet stem, stages 1-3 (output stride 16, 1024 channels): OFA's image embedder.

Bottlenecks are v1.5 (stride on the 3x3 conv). Names match torchvision/OFA (`conv1`, `bn1`,
`layer1.0.downsample.0`, ...) so ImageNet or OFA weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ofa_ufo.layers.drop_path import DropPath
from ofa_ufo.layers.inference_cache import cache_of, kept
from ofa_ufo.layers.packed_linear import tracing
from ofa_ufo.layers.rep_conv import fold_bn

OUT_CHANNELS = 1024
STAGE_CHANNELS = (256, 512, 1024)  # stages 1-3, strides 4, 8, 16


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.bn3.zero_init = True  # read by the model's _init_weights: the block starts as the identity
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if folding(self):
            identity = x if self.downsample is None else folded_conv(self.downsample[0], self.downsample[1], x)
            out = folded_conv(self.conv1, self.bn1, x, relu=True)
            out = folded_conv(self.conv2, self.bn2, out, relu=True)
            return folded_conv(self.conv3, self.bn3, out, relu=True, residual=identity)
        forget_folds(self)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + self.drop_path(out))


def folding(module: nn.Module) -> bool:
    """Whether `module` runs the inference path: no gradients, not traced, no autocast (whose casts the fused
    ops would skip), no drop path that would drop. There each conv and its BatchNorm are one conv (a BatchNorm
    on batch statistics stays a module, `folded_conv`), with the ReLU (and a residual add) fused in where
    oneDNN can: at Base, 384 px, batch 8, BatchNorm, ReLU and the residual adds were about a third of the
    bf16 encoder's time, as long as its convolutions."""
    return (not torch.is_grad_enabled() and not tracing() and not torch.is_autocast_enabled("cpu")
            and not torch.is_autocast_enabled("cuda") and not _drops(module))


def _drops(module: nn.Module) -> bool:
    return any(m.training and m.rate > 0 for m in module.modules() if isinstance(m, DropPath))


def _can_fuse(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, relu: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu?(bn(conv(x)) [+ residual]) with bn in eval mode, computed as one conv whose weight and bias fold
    the BatchNorm in (`fold_bn`, as RepConv's re-parameterisation), the same result up to rounding. A
    BatchNorm left in train mode (batch statistics) runs as a module.

    The fold is kept on the conv for the next call while its five source tensors are the same tensors at the
    same versions, on a CPU in oneDNN's blocked layout (at Base, 384 px, batch 1, redoing the 94 folds was
    about an eighth of the bf16 encoder's time, and a 3x3 conv of layer 3 ran about 2x faster from a blocked
    weight, bf16 or fp32). BatchNorm's running statistics (in a train-mode forward) and fused optimizers (after
    a forward with gradients) update tensors in place without bumping their versions, so every forward that
    does not fold drops the kept folds (`forget_folds`), as `PackedLinear` drops its packed weight."""
    if bn.training:
        cache_of(conv).pop("folded", None)
        out = bn(conv(x))
        out = out if residual is None else out + residual
        return out.relu_() if relu else out
    fuse = _can_fuse(x)
    weight, bias = _fold(conv, bn, x, fuse)
    if fuse:
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if residual is not None:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, weight, bias, *args, "add", None, "relu" if relu else None, [], "")
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "relu" if relu else "none", [], "")
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        out = out.add_(residual)
    return out.relu_() if relu else out


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, fuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`fold_bn(conv.weight, bn)` in the input's dtype (a frozen fp32 stem in a bf16 step computes in bf16, as
    autocast would), kept on the conv (see `folded_conv`); for oneDNN's fused conv (`fuse`) in its blocked
    layout for the input's shape, which serves other batch and image sizes too."""
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = (t.to(x.dtype) for t in fold_bn(conv.weight, bn))
        if fuse:
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                weight, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(x.shape))
        return weight, bias

    return kept(conv, "folded", (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var), build,
                (x.dtype, fuse))


def forget_folds(module: nn.Module) -> None:
    """Drop the folds kept on `module`'s own convolutions (not those of its sub-blocks, which drop theirs)."""
    for child in module.children():
        if isinstance(child, nn.Conv2d):
            cache_of(child).pop("folded", None)
        elif isinstance(child, nn.Sequential) and not any(isinstance(m, Bottleneck) for m in child):
            forget_folds(child)  # a downsample branch


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes convolutions in on `device_type`, or None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class ResNetStem(nn.Module):
    """Image (B, 3, H, W) -> feature grid (B, 1024, H/16, W/16)."""

    def __init__(self, layers: tuple[int, int, int], drop_path_rate: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(64, 64, layers[0], 1, drop_path_rate)
        self.layer2 = self._stage(256, 128, layers[1], 2, drop_path_rate)
        self.layer3 = self._stage(512, 256, layers[2], 2, drop_path_rate)

    @staticmethod
    def _stage(in_channels: int, planes: int, blocks: int, stride: int, drop_path_rate: float) -> nn.Sequential:
        """Drop-path rate rises linearly within the stage; its first block never drops (as in OFA)."""
        rates = [drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]
        modules = [Bottleneck(in_channels, planes, stride)]
        modules += [Bottleneck(planes * Bottleneck.expansion, planes, 1, rates[i]) for i in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(
        self, pixel_values: torch.Tensor, return_stages: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stride-16 grid, or with `return_stages` the outputs of stages 1-3 (strides 4, 8, 16;
        `STAGE_CHANNELS` channels) for multi-scale heads such as the dense detector."""
        if torch.is_grad_enabled() and self._frozen(pixel_values):
            # Nothing here trains (the demo defaults freeze the stem after its warm-up), so no graph is kept and
            # the stem runs its inference path, with folds kept from step to step, in the dtype autocast would
            # have given its convolutions.
            dtype = _autocast_dtype(pixel_values.device.type) or pixel_values.dtype
            with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
                return self(pixel_values.to(dtype), return_stages)
        # NHWC activations take oneDNN's (and cuDNN's) faster convolution kernels: ~20% on CPU.
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        if folding(self):
            x = self.maxpool(folded_conv(self.conv1, self.bn1, pixel_values, relu=True))
        else:
            forget_folds(self)
            x = self.maxpool(self.relu(self.bn1(self.conv1(pixel_values))))
        stride4 = self.layer1(x)
        stride8 = self.layer2(stride4)
        stride16 = self.layer3(stride8)
        return (stride4, stride8, stride16) if return_stages else stride16

    def _frozen(self, pixel_values: torch.Tensor) -> bool:
        """No gradient can reach this stem's weights or input, and its forward changes no state: every
        BatchNorm on running statistics, no drop path that drops."""
        return (not pixel_values.requires_grad and not tracing()
                and not any(p.requires_grad for p in self.parameters())
                and not any(m.training for m in self.modules() if isinstance(m, nn.BatchNorm2d))
                and not _drops(self))
