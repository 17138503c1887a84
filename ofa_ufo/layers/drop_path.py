"""Stochastic depth: drop a whole residual branch per sample."""

import torch
from torch import nn


class DropPath(nn.Module):
    """Zero a residual branch for a random subset of samples, rescaling the rest (Huang et al. 2016)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def linear_rates(max_rate: float, depth: int) -> list[float]:
    """Rates rising linearly from 0 at the first layer to `max_rate` at the last (OFA's schedule)."""
    if depth <= 1:
        return [0.0] * depth
    return [max_rate * i / (depth - 1) for i in range(depth)]
