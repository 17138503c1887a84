"""Conv + BN + activation, and RepVGG's re-parameterisable conv (DAMO-YOLO's RepGFPN building block).

A `RepConv` trains as parallel 3x3 and 1x1 conv+BN branches (plus an identity BN when the shape allows)
and is fused for inference into one 3x3 conv with bias: the same function, one kernel launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Module):
    """Conv (no bias, 'same' padding) -> BatchNorm -> SiLU (or nothing when `act` is False)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the conv that equals `bn(conv(x))` in eval mode (W x gamma/std, beta - mean x gamma/std),
    computed in fp32 and returned in the kernel's dtype (a bf16 model folds without bf16 rounding in between)."""
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)  # (out,)
    folded = kernel.float() * scale[:, None, None, None]
    return folded.to(kernel.dtype), (bn.bias.float() - bn.running_mean.float() * scale).to(kernel.dtype)


class RepConv(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN (+ identity BN when in == out and stride 1), summed, then SiLU.

    `fuse()` folds the branches into a single 3x3 conv with bias (RepVGG); the module then computes the
    same function in eval mode with one conv. Fusing is one-way: the branches are dropped.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.dense = ConvBNAct(in_channels, out_channels, 3, stride, act=False)
        self.pointwise = ConvBNAct(in_channels, out_channels, 1, stride, act=False)
        self.identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.act = nn.SiLU(inplace=True)
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def _fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (out, in, 3, 3) kernel and (out,) bias of the sum of all branches."""
        kernel, bias = fold_bn(self.dense.conv.weight, self.dense.bn)
        kernel_1x1, bias_1x1 = fold_bn(F.pad(self.pointwise.conv.weight, [1, 1, 1, 1]), self.pointwise.bn)
        kernel, bias = kernel + kernel_1x1, bias + bias_1x1
        if self.identity is not None:
            delta = torch.zeros_like(kernel)
            channels = torch.arange(self.in_channels, device=kernel.device)
            delta[channels, channels, 1, 1] = 1.0  # the identity as a centred 3x3 kernel
            kernel_id, bias_id = fold_bn(delta, self.identity)
            kernel, bias = kernel + kernel_id, bias + bias_id
        return kernel, bias

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace the branches by one 3x3 conv with bias (uses the BN running statistics)."""
        if self.fused is not None:
            return
        kernel, bias = self._fused_kernel()
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, self.stride, 1, bias=True)
        conv = conv.to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        self.fused = conv
        self.dense = self.pointwise = self.identity = None


def fuse_reparam(module: nn.Module) -> nn.Module:
    """Fuse every `RepConv` inside `module` in place (for inference and export); returns `module`."""
    for child in module.modules():
        if isinstance(child, RepConv):
            child.fuse()
    return module
