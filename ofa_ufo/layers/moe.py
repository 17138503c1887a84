"""UFO's task mixture-of-experts pieces: per-task routers and an FFN with a shared expert plus
one expert per task, both with elastic (leading-slice) hidden width.

Routing is per task, not per token or image: each task has two router logits per layer
[shared, own]. Training draws a straight-through hard Gumbel-softmax gate per sample
(temperature 5, logits start at zero); evaluation takes the argmax deterministically, a tie
(the untrained state) going to the task's own expert as in the reference.

A from-scratch run on a small budget can hold the task experts back (`lock_to_shared`): every
task then trains the shared expert, and `start_experts` later copies it into each task's expert,
as the reference duplicates a trained MLP (training config `task_experts_from`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ofa_ufo.layers.elastic import ElasticMLP

GUMBEL_TAU = 5.0
SHARED_LOCK = 30.0  # router margin [shared - own] of a locked task: no Gumbel draw crosses it (p ~ 1e-13)


def route(logits: torch.Tensor, task_ids: torch.Tensor, training: bool, tau: float = GUMBEL_TAU) -> torch.Tensor:
    """Gates (B, 2) = [shared, own] for each sample's task; one-hot, straight-through in training."""
    rows = logits[task_ids]  # (B, 2)
    if not training:
        own = rows[:, 1] >= rows[:, 0]
        return torch.stack([~own, own], dim=1).to(rows.dtype)
    uniform = torch.empty_like(rows).uniform_(1e-5, 0.9999)
    soft = F.softmax((rows - torch.log(-torch.log(uniform))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return hard + soft - soft.detach()


class TaskExperts(nn.Module):
    """One `ElasticMLP` per task, stored as stacked tensors so a task's expert is an index."""

    def __init__(self, num_tasks: int, dim: int, hidden: int):
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.empty(num_tasks, hidden, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_tasks, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(num_tasks, dim, hidden))
        self.fc2_bias = nn.Parameter(torch.zeros(num_tasks, dim))

    def forward(self, x: torch.Tensor, task: int, hidden: int | None = None) -> torch.Tensor:
        """x (n, L, D) of one task -> (n, L, D)."""
        hidden = hidden or self.fc1_weight.shape[1]
        h = F.gelu(F.linear(x, self.fc1_weight[task, :hidden], self.fc1_bias[task, :hidden]))
        return F.linear(h, self.fc2_weight[task, :, :hidden], self.fc2_bias[task])

    def init_from(self, mlp: ElasticMLP, copy) -> None:
        """Start every task expert as a copy of the shared one (the reference duplicates the MLP).

        `copy(dst, src)` is the caller's initialiser (transformers' skips tensors already loaded).
        """
        for name, source in (("fc1_weight", mlp.fc1.weight), ("fc1_bias", mlp.fc1.bias),
                             ("fc2_weight", mlp.fc2.weight), ("fc2_bias", mlp.fc2.bias)):
            target = getattr(self, name)
            copy(target, source.detach().expand_as(target))


class TaskMoEFFN(nn.Module):
    """Shared expert + per-task experts behind a per-task router (one [shared, own] logit pair each).

    Samples are grouped by task (a loop over the tasks present, never over samples); in
    evaluation only the chosen expert of each task runs.
    """

    def __init__(self, num_tasks: int, dim: int, hidden: int, tau: float = GUMBEL_TAU):
        super().__init__()
        self.shared = ElasticMLP(dim, hidden)
        self.experts = TaskExperts(num_tasks, dim, hidden)
        self.router = nn.Parameter(torch.zeros(num_tasks, 2))
        self.tau = tau

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, hidden: int | None = None) -> torch.Tensor:
        """x (B, L, D), task_ids (B,) -> (B, L, D)."""
        gates = route(self.router, task_ids, self.training, self.tau)  # (B, 2)
        out = torch.zeros_like(x)
        for task in task_ids.unique().tolist():
            rows = (task_ids == task).nonzero().flatten()
            out[rows] = self._expert_mix(x[rows], task, gates[rows], hidden).to(out.dtype)  # autocast: bf16
        return out

    def _expert_mix(self, x: torch.Tensor, task: int, gates: torch.Tensor, hidden: int | None) -> torch.Tensor:
        if self.training and self.locked(task):  # the own expert waits (`lock_to_shared`): skip it
            return self.shared(x, hidden)
        if not self.training:  # deterministic route: run only the chosen expert
            use_own = bool(gates[0, 1])
            return self.experts(x, task, hidden) if use_own else self.shared(x, hidden)
        shared, own = self.shared(x, hidden), self.experts(x, task, hidden)
        return gates[:, 0, None, None] * shared + gates[:, 1, None, None] * own

    def uses_own_expert(self, task: int) -> bool:
        """The evaluation-time route of `task` (tie -> own expert)."""
        return bool(self.router[task, 1] >= self.router[task, 0])

    def locked(self, task: int) -> bool:
        """Whether `task` is held on the shared expert by `lock_to_shared`."""
        return bool(self.router[task, 0] - self.router[task, 1] >= SHARED_LOCK / 2)

    @torch.no_grad()
    def lock_to_shared(self) -> None:
        """Route every task to the shared expert, in training and evaluation, until `start_experts`."""
        self.router.copy_(torch.tensor([SHARED_LOCK, 0.0]).expand_as(self.router))

    @torch.no_grad()
    def start_experts(self) -> None:
        """Each task's expert becomes a copy of the (trained) shared one; routers back at zero."""
        self.experts.init_from(self.shared, lambda target, source: target.copy_(source))
        self.router.zero_()
