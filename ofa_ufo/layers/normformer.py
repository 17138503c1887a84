"""Pre-LN transformer layers with NormFormer's extra norms (post-attention LN, FFN LN, head scale).

Module names follow the OFA Hugging Face port so official weights load by renaming prefixes only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache

from ofa_ufo.layers.attention import OFAAttention
from ofa_ufo.layers.drop_path import DropPath


# FFN activations (B, L, ffn_dim) above this size are recomputed in backward (Base at 384 px: ~80 MB saved per
# step); below it, as in the demo's 64 px steps, the recompute and its bookkeeping cost more time than the few MB
# are worth (the tiny demo's model step ~7 % faster, benchmarks/LOG.md).
_CHECKPOINT_BYTES = 4 * 2**20


class EncoderLayer(nn.Module):
    """x + attn_ln(SelfAttn(LN(x))) then y + fc2(ffn_ln(act(fc1(LN(y))))), each branch with dropout and drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        drop_path: float = 0.0,
        activation: str = "gelu",
        normformer: bool = True,
        scale_heads: bool = True,
        scale_factor: float = 2.0,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.self_attn = OFAAttention(dim, num_heads, attention_dropout, scale_factor, scale_heads, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn_mid_layer_norm = nn.LayerNorm(dim) if normformer else nn.Identity()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ffn_layer_norm = nn.LayerNorm(ffn_dim) if normformer else nn.Identity()
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); attn_bias as in `OFAAttention.forward`."""
        h = self.self_attn_mid_layer_norm(self.self_attn(self.self_attn_layer_norm(x), attn_bias))
        x = x + self.drop_path(self.dropout(h))
        return self._ffn(x)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.final_layer_norm(x))  # (B, L, ffn_dim)
        if torch.is_grad_enabled() and h.requires_grad and h.numel() * h.element_size() > _CHECKPOINT_BYTES:
            # Recomputed in backward: keeps one (B, L, ffn_dim) activation per layer instead of three
            # (about 80 MB of a Base training step at 384 px) for an element-wise pass.
            h = checkpoint(self._act_norm, h, use_reentrant=False)
        else:
            h = self._act_norm(h)
        return x + self.drop_path(self.dropout(self.fc2(h)))

    def _act_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.ffn_layer_norm(self.activation_dropout(self.activation(h)))


class DecoderLayer(EncoderLayer):
    """Encoder layer plus a cross-attention block (own pre-LN and NormFormer post-LN) before the FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, **kwargs):
        super().__init__(dim, num_heads, ffn_dim, **kwargs)
        self.cross_attn = OFAAttention(
            dim, num_heads, kwargs.get("attention_dropout", 0.0), kwargs.get("scale_factor", 2.0),
            kwargs.get("scale_heads", True), kwargs.get("layer_idx"),
        )
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn_mid_layer_norm = nn.LayerNorm(dim) if kwargs.get("normformer", True) else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        cross_bias: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """x (B, T, D), encoder_hidden_states (B, S, D) -> (B, T, D)."""
        h = self.self_attn(self.self_attn_layer_norm(x), self_bias, cache=cache)
        x = x + self.drop_path(self.dropout(self.self_attn_mid_layer_norm(h)))
        h = self.cross_attn(self.cross_attn_layer_norm(x), cross_bias, encoder_hidden_states, cache=cache)
        x = x + self.drop_path(self.dropout(self.cross_attn_mid_layer_norm(h)))
        return self._ffn(x)
