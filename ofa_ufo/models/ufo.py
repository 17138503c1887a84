"""UFO supernet: ViT blocks over the ResNet patch grid, routed per task, with elastic dims.

Placement (DESIGN §2): ResNet grid tokens -> [in_proj] -> + position embedding + task embedding
-> blocks (shared attention, task-MoE FFN) -> LayerNorm -> the encoder's `image_proj`.
The task embedding is UFO's per-task token embedding reduced to one learned vector per task
added to every grid token (UFO gives each task its own patch embedding, CLS token and position
table; here the ResNet stem and positions stay shared so zero blocks is exactly OFA).

Elastic dims share weights by leading slices (AutoFormer / UFO): the first k heads of the
Q, K and V projections, the first h hidden units of every FFN expert, the first d blocks.
An extracted (dense) supernet has no routers and stores exactly the sliced sizes per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ofa_ufo.layers.elastic import ElasticAttention, ElasticMLP
from ofa_ufo.layers.moe import TaskMoEFFN


@dataclass(frozen=True)
class SupernetArch:
    """One subnet: `depth` blocks, per-block head count and FFN hidden width."""

    depth: int
    heads: tuple[int, ...]
    hidden: tuple[int, ...]


class SupernetBlock(nn.Module):
    """Pre-LN ViT block: shared attention, then a task-MoE FFN (routed) or one dense FFN (extracted)."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, num_tasks: int, routed: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ElasticAttention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = TaskMoEFFN(num_tasks, dim, hidden) if routed else ElasticMLP(dim, hidden)
        for residual_out in (self.attn.proj, self.ffn.shared.fc2 if routed else self.ffn.fc2):
            residual_out.zero_init = True  # the block starts as the identity (OFAUFOPreTrainedModel._init_weights)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, heads: int | None, hidden: int | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), heads)
        h = self.norm2(x)
        return x + (self.ffn(h, task_ids, hidden) if isinstance(self.ffn, TaskMoEFFN) else self.ffn(h, hidden))


class UFOSupernet(nn.Module):
    """Grid tokens (B, N, C) + their position ids + task ids -> refined tokens (B, N, dim)."""

    def __init__(self, vision, grid_channels: int, image_bucket_size: int):
        super().__init__()
        dim = vision.supernet_dim
        self.routed = vision.supernet_routed
        self.in_proj = nn.Linear(grid_channels, dim) if dim != grid_channels else nn.Identity()
        self.pos_embed = nn.Embedding(image_bucket_size**2 + 1, dim)
        self.task_embed = nn.Embedding(vision.supernet_num_tasks, dim)
        heads, hidden = vision.layer_heads, vision.layer_hidden
        self.blocks = nn.ModuleList(
            SupernetBlock(dim, heads[i], vision.supernet_head_dim, hidden[i], vision.supernet_num_tasks, self.routed)
            for i in range(vision.supernet_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.arch: SupernetArch | None = None  # None: the largest subnet

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        if not self.routed:  # an extracted subnet serves one task: its embedding is row 0
            task_ids = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        elif task_ids is None:
            raise ValueError("this model has a task-routed supernet: pass task_ids (vision_config.route_id per sample)")
        x = self.in_proj(tokens) + self.pos_embed(position_ids) + self.task_embed(task_ids)[:, None]
        arch = self.arch
        depth = len(self.blocks) if arch is None else arch.depth
        for i, block in enumerate(self.blocks[:depth]):
            x = block(x, task_ids, None if arch is None else arch.heads[i], None if arch is None else arch.hidden[i])
        return self.norm(x)

    def largest_arch(self) -> SupernetArch:
        return SupernetArch(
            len(self.blocks), tuple(b.attn.heads for b in self.blocks),
            tuple(b.ffn.shared.fc1.out_features if self.routed else b.ffn.fc1.out_features for b in self.blocks),
        )
