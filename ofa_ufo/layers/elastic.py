"""Elastic layers of the UFO supernet: widths cut to a leading slice of the stored (largest) weights.

AutoFormer / UFO weight sharing: a smaller subnet uses the first k attention heads (fixed head
dim) and the first h hidden units of an MLP, so every arch of the supernet trains the same tensors
and an extracted subnet is those slices copied out (`ofa_ufo.deploy.subnets`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ElasticAttention", "ElasticMLP"]


class ElasticAttention(nn.Module):
    """Multi-head self-attention whose head count can be cut to the first k heads (fixed head dim)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D) using the first `heads` heads."""
        heads = heads or self.heads
        width = heads * self.head_dim
        weight, bias = self.sliced_qkv(width)
        batch, length, _ = x.shape
        qkv = F.linear(x, weight, bias).view(batch, length, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, hd)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return F.linear(out, self.proj.weight[:, :width], self.proj.bias)

    def sliced_qkv(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Leading `width` rows of each of the Q, K and V chunks, kept aligned head by head."""
        full = self.heads * self.head_dim
        weight = self.qkv.weight.view(3, full, -1)[:, :width].reshape(3 * width, -1)
        return weight, self.qkv.bias.view(3, full)[:, :width].reshape(3 * width)


class ElasticMLP(nn.Module):
    """fc1 -> GELU -> fc2 whose hidden width can be cut to its first `hidden` units."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hidden: int | None = None) -> torch.Tensor:
        hidden = hidden or self.fc1.out_features
        h = F.gelu(F.linear(x, self.fc1.weight[:hidden], self.fc1.bias[:hidden]))
        return F.linear(h, self.fc2.weight[:, :hidden], self.fc2.bias)
