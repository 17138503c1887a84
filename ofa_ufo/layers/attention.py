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
        attn_bias: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """hidden_states (R, Lq, D); attn_bias broadcastable to (B, H, Lq, Lk), or a tuple of such
        terms that are summed (kept apart so that training keeps only the small ones, for example a
        (1, H, L, L) position bias and a (B, 1, 1, L) padding mask); returns (R, Lq, D).

        For cross-attention the source may have fewer rows than the queries (B rows for R = B * k
        beams or samples, each group of k consecutive rows sharing one source row): the k query
        rows are then folded into the query length, so keys and values are projected, cached and
        attended once per source row instead of once per beam.
        """
        rows, length, dim = hidden_states.shape
        query = split_heads(self.q_proj(hidden_states), self.num_heads)  # (R, H, Lq, hd)
        key, value = self._key_value(hidden_states, key_value_states, cache)  # (B, H, Lk, hd)
        group = rows // key.shape[0]
        if group * key.shape[0] != rows:
            raise ValueError(f"{rows} query rows cannot share {key.shape[0]} key/value rows")
        biases = () if attn_bias is None else (attn_bias,) if torch.is_tensor(attn_bias) else tuple(attn_bias)
        biases = tuple(b.to(query.dtype) for b in biases)
        if group > 1:
            query = _fold(query, group)  # (B, H, k * Lq, hd)
            biases = tuple(b.repeat(1, 1, group, 1) if b.shape[2] > 1 else b for b in biases)
        dropout = self.dropout if self.training else 0.0
        if torch.is_grad_enabled() and query.device.type == "cpu" and not dropout:
            out = _RecomputedAttention.apply(query, key, value, self.scaling, *biases)  # (B, H, Lq, hd)
        else:
            mask = sum(biases[1:], biases[0]) if biases else None
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, scale=self.scaling,
            )  # (B, H, k * Lq, hd)
        if group > 1:
            out = _unfold(out, group)  # (R, H, Lq, hd)
        if self.c_attn is not None:
            out = out * self.c_attn.view(1, -1, 1, 1)
        return self.out_proj(out.transpose(1, 2).reshape(rows, length, dim))

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


# Backward works on blocks of heads whose (Lq, Lk) score tensors stay within this size. glibc hands
# out blocks above its 32 MiB mmap ceiling as fresh pages every time (page faults: a (2, 12, 584, 584)
# fp32 score tensor took ~70 ms to fill at Base, 384 px, against ~3 ms for one that reuses memory).
_BLOCK_BYTES = 8 * 2**20


class _RecomputedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + sum(biases)) v whose backward recomputes the probabilities.

    On CPU, SDPA computes a bias gradient only on its math path, which keeps the (B, H, Lq, Lk)
    probabilities for backward (33 MB per encoder layer at Base, 384 px, batch 2). Here backward
    rebuilds them from q, k and the biases (which broadcast over the batch, so they are smaller),
    a block of heads at a time. Gradients: dS = P * (dP - rowsum(dO * O)).
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                *biases: torch.Tensor) -> torch.Tensor:
        mask = sum(biases[1:], biases[0]).detach() if biases else None
        # detached: SDPA picks its flash kernel only for inputs that do not require grad
        out = F.scaled_dot_product_attention(query.detach(), key.detach(), value.detach(), attn_mask=mask, scale=scale)
        ctx.scale = scale
        ctx.save_for_backward(query, key, value, out, *biases)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, out, *biases = ctx.saved_tensors
        batch, heads, q_len, _ = query.shape
        per_head = q_len * key.shape[2] * query.element_size()
        # whole batch rows per block when they fit (few Python steps for short sequences), else heads
        rows = max(1, min(batch, _BLOCK_BYTES // (heads * per_head)))
        block = heads if rows > 1 or heads * per_head <= _BLOCK_BYTES else max(1, _BLOCK_BYTES // per_head)
        grad_query, grad_key, grad_value = (torch.empty(t.shape, dtype=t.dtype, device=t.device)
                                            for t in (query, key, value))
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, Lq, 1): rowsum(dO * O)
        grad_biases = [torch.empty_like(bias) if ctx.needs_input_grad[4 + i] else None
                       for i, bias in enumerate(biases)]
        for r in range(0, batch, rows):
            for h in range(0, heads, block):
                at = (slice(r, r + rows), slice(h, h + block))
                q, k, v, d_out = query[at], key[at], value[at], grad_out[at]  # (b, h, L, d)
                scores = torch.matmul(q, k.transpose(-1, -2)).mul_(ctx.scale)  # (b, h, Lq, Lk)
                for bias in biases:
                    scores.add_(_bias_block(bias, *at))
                probs = torch.softmax(scores, dim=-1)
                del scores
                grad_value[at] = torch.matmul(probs.transpose(-1, -2), d_out)
                grad_scores = torch.matmul(d_out, v.transpose(-1, -2))  # dP
                grad_scores.sub_(delta[at]).mul_(probs)  # dS
                del probs
                grad_query[at] = torch.matmul(grad_scores, k)
                grad_key[at] = torch.matmul(grad_scores.transpose(-1, -2), q)
                for grad_bias in grad_biases:
                    if grad_bias is not None:
                        region = _bias_block(grad_bias, *at)
                        # a region that broadcasts over rows or heads sums several blocks: the first writes
                        first = (r == 0 or grad_bias.shape[0] > 1) and (h == 0 or grad_bias.shape[1] > 1)
                        part = grad_scores.sum_to_size(region.shape)
                        region.copy_(part) if first else region.add_(part)
        return grad_query.mul_(ctx.scale), grad_key.mul_(ctx.scale), grad_value, None, *grad_biases


def _bias_block(bias: torch.Tensor, rows: slice, heads: slice) -> torch.Tensor:
    """The view of a (B|1, H|1, Lq|1, Lk|1) bias that applies to batch `rows` and `heads`."""
    return bias[rows if bias.shape[0] > 1 else slice(None), heads if bias.shape[1] > 1 else slice(None)]


def _fold(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B * k, H, L, d) -> (B, H, k * L, d): consecutive rows of a group become one longer row."""
    rows, heads, length, dim = x.shape
    return x.view(rows // group, group, heads, length, dim).transpose(1, 2).reshape(rows // group, heads, group * length, dim)


def _unfold(x: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of `_fold`: (B, H, k * L, d) -> (B * k, H, L, d)."""
    batch, heads, total, dim = x.shape
    return x.view(batch, heads, group, total // group, dim).transpose(1, 2).reshape(batch * group, heads, total // group, dim)
