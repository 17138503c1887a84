"""Multi-head attention with an additive bias, OFA's scaling, per-head output scale and KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache

from ofa_ufo.layers.position import split_heads


class OFAAttention(nn.Module):
    """Self- or cross-attention as OFA computes it.

    Logits are q.k / sqrt(scale_factor * head_dim) plus a caller-built additive bias that carries
    position biases and masks; SDPA does the rest. `c_attn` is NormFormer's learnable per-head scale.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        scale_factor: float = 2.0,
        scale_heads: bool = True,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = (self.head_dim * scale_factor) ** -0.5
        self.dropout = dropout
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.c_attn = nn.Parameter(torch.ones(num_heads)) if scale_heads else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, Lq, D); attn_bias broadcastable to (B, H, Lq, Lk); returns (B, Lq, D)."""
        batch, length, dim = hidden_states.shape
        query = split_heads(self.q_proj(hidden_states), self.num_heads)  # (B, H, Lq, hd)
        key, value = self._key_value(hidden_states, key_value_states, cache)  # (B, H, Lk, hd)
        if attn_bias is not None:
            attn_bias = attn_bias.to(query.dtype)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_bias,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scaling,
        )  # (B, H, Lq, hd)
        if self.c_attn is not None:
            out = out * self.c_attn.view(1, -1, 1, 1)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))

    def _key_value(
        self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None, cache: Cache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project keys/values, reading or extending the cache (cross-attention K/V are computed once)."""
        is_cross = key_value_states is not None
        sub_cache = cache
        if isinstance(cache, EncoderDecoderCache):
            sub_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
            if is_cross and cache.is_updated.get(self.layer_idx):
                layer = sub_cache.layers[self.layer_idx]
                return layer.keys, layer.values
        source = key_value_states if is_cross else hidden_states
        key = split_heads(self.k_proj(source), self.num_heads)
        value = split_heads(self.v_proj(source), self.num_heads)
        if sub_cache is not None:
            key, value = sub_cache.update(key, value, self.layer_idx)
            if is_cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
        return key, value
