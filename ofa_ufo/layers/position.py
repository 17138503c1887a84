"""OFA's position scheme: index tables for the relative biases and the decoupled absolute bias.

Positions never enter the token embeddings; they reach attention only as additive biases.
Index tables are pure functions of their sizes, cached per process rather than stored as
buffers, so checkpoints do not carry them (OFA's port persisted ~66 MB of them).
"""

import math
from functools import lru_cache

import torch
from torch import nn


@lru_cache(maxsize=8)
@torch.inference_mode(False)  # cached for the process: must stay usable by autograd later
def text_relative_buckets(bucket_size: int, max_position: int) -> torch.Tensor:
    """(max_position, max_position) bucket index of i - j: exact within bucket_size/2, log-spaced beyond.

    Indices lie in [0, 2 * bucket_size - 2] (the table has 2 * bucket_size - 1 rows).
    """
    rel = torch.arange(max_position)[:, None] - torch.arange(max_position)[None, :]
    mid = bucket_size // 2
    dist = rel.abs()
    safe = dist.clamp(min=mid)  # log() only needed beyond mid; avoid log(0)
    log_bucket = torch.ceil(torch.log(safe / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(dist <= mid, rel, log_bucket.long() * rel.sign())
    return bucket + bucket_size - 1


@lru_cache(maxsize=8)
@torch.inference_mode(False)
def image_relative_buckets(bucket_size: int) -> torch.Tensor:
    """(n + 1, n + 1) index of the 2-D offset between grid cells, n = bucket_size ** 2 (BEiT style).

    Row/column 0 is the special position id 0; the last three table entries serve it.
    """
    ys, xs = torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, n)
    rel = coords[:, :, None] - coords[:, None, :] + bucket_size - 1  # (2, n, n)
    span = 2 * bucket_size - 1
    num_entries = span * span + 3
    n = bucket_size * bucket_size
    index = torch.zeros(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = rel[0] * span + rel[1]
    index[0, :] = num_entries - 3
    index[:, 0] = num_entries - 2
    index[0, 0] = num_entries - 1
    return index


def image_position_ids(height: int, width: int, bucket_size: int, device: torch.device) -> torch.Tensor:
    """(height * width,) row-major ids `row * bucket_size + col + 1` of a feature grid."""
    rows = torch.arange(height, device=device)[:, None] * bucket_size
    cols = torch.arange(width, device=device)[None, :]
    return (rows + cols + 1).flatten()


CODE_FILLER_POSITION = 1024  # OFA's image position id for decoder steps after the last code (</s>)


def code_position_ids(side: int, length: int, bucket_size: int, device: torch.device) -> torch.Tensor:
    """(length,) image position ids of decoder positions 0..length-1 when the target is a side x side
    grid of VQGAN codes (OFA's decoder `image_position_idx`): 0 (the special id) for the start token,
    the row-major grid ids `row * bucket_size + col + 1` for the codes, then OFA's filler id 1024
    (the table's last id if smaller) for any later position, such as the one that predicts </s>."""
    if not 0 < side <= bucket_size:
        raise ValueError(f"a {side}x{side} code grid does not fit the 2-D relative bias (image_bucket_size="
                         f"{bucket_size}); generate at most {bucket_size}x{bucket_size} codes")
    steps = torch.arange(length, device=device)
    k = (steps - 1).clamp(min=0)  # code index of each position
    ids = (k // side) * bucket_size + k % side + 1
    ids = ids.masked_fill(steps == 0, 0)
    return ids.masked_fill(steps > side * side, min(CODE_FILLER_POSITION, bucket_size * bucket_size))


def relative_bias(table: nn.Embedding | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Look up a per-head bias table (entries, H): index (Lq, Lk) -> bias (1, H, Lq, Lk).

    Gathers rows of the small (H, entries) transpose with `index_select`, so the result comes out
    heads-first and contiguous, and backward is an `index_add` into a small buffer (a lookup then
    permute leaves a strided tensor that costs a slow transposing copy of every (H, Lq, Lk) bias).
    """
    weight = table.weight if isinstance(table, nn.Embedding) else table
    return weight.t().contiguous().index_select(1, index.reshape(-1)).view(1, weight.shape[1], *index.shape)


def absolute_bias(
    q_linear: nn.Linear, k_linear: nn.Linear, q_pos: torch.Tensor, k_pos: torch.Tensor, num_heads: int, scaling: float
) -> torch.Tensor:
    """Decoupled (TUPE) position bias <Wq p_i, Wk p_j> per head.

    q_pos (Bq, Lq, D), k_pos (Bk, Lk, D) with Bq, Bk in {1, B} -> (max(Bq, Bk), H, Lq, Lk).
    """
    q = split_heads(q_linear(q_pos), num_heads) * scaling
    k = split_heads(k_linear(k_pos), num_heads)
    return q @ k.transpose(-1, -2)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, H, L, D / H)."""
    batch, length, dim = x.shape
    return x.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)
