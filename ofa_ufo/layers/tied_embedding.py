"""The tied (V, D) token matrix: the output projection's logits and the gradient modes of its lookups.

Both are speed tricks measured on CPU (benchmarks/LOG.md): a few-row layout for decoding logits,
and lookups whose gradients reach the matrix without a dense (V, D) buffer per lookup in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["training_lookups", "vocab_logits"]


# Up to this many positions, logits are computed as (W @ states^T)^T: one pass down the rows of the
# (V, D) output matrix. oneDNN/MKL run x @ W^T for a few rows 2-3x slower (the decoding case: one row
# per beam; benchmarks/LOG.md); for many rows (training batches) the usual layout wins.
_FEW_ROWS = 128


def vocab_logits(states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """states (..., D) @ weight (V, D)^T -> logits (..., V)."""
    flat = states.reshape(-1, states.shape[-1])  # (N, D)
    if flat.shape[0] > _FEW_ROWS:
        return F.linear(states, weight)
    return torch.mm(weight, flat.T).T.contiguous().view(*states.shape[:-1], weight.shape[0])  # (N, V) -> (..., V)


def _densify_grad(param: torch.Tensor) -> None:
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


class _LookupIntoGrad(torch.autograd.Function):
    """Embedding lookup whose backward adds its rows straight into `embedding.weight.grad`.

    The weight enters detached, so autograd has no edge from the lookup to it: the output
    projection's dense gradient lands in `.grad` first (AccumulateGrad runs as soon as that one
    edge is done) and the lookups' few rows are then added in place, instead of autograd summing
    a dense and a sparse gradient out of place (a fresh (V, D) buffer and a copy per lookup).
    `anchor` is a grad-requiring scalar that makes autograd call this backward at all.
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, anchor: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        ctx.embedding = embedding
        ctx.save_for_backward(ids)
        return F.embedding(ids, embedding.weight.detach(), embedding.padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None]:
        (ids,) = ctx.saved_tensors
        weight = ctx.embedding.weight
        ids = ids.reshape(-1)
        rows = grad.reshape(ids.shape[0], -1)  # (N, D)
        if ctx.embedding.padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            rows = rows.masked_fill(ids.eq(ctx.embedding.padding_idx).unsqueeze(1), 0.0)
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, ids, rows.to(weight.grad.dtype))
        return None, None, None


@contextlib.contextmanager
def training_lookups(embedding: nn.Embedding, mode: str | None) -> Iterator[None]:
    """How token lookups inside send their gradients into the tied (V, D) matrix.

    The matrix also gets the output projection's dense gradient in the same backward. "sparse":
    the lookups send sparse rows, which autograd adds to that dense gradient (out of place, but
    without zero-filling a dense (V, D) buffer per lookup: about 0.2 s each at Base on 2 cores);
    a hook turns a gradient that stayed sparse (a loss that never used the logits) dense, so
    optimizers see dense. "in_place": `_LookupIntoGrad`, which also saves the out-of-place sums
    but writes `.grad` outside autograd (see `tied_gradients_in_place`). None: plain lookups.
    """
    weight = embedding.weight
    # frozen embeddings get no gradient; under FSDP the weight is a non-leaf view of a flat shard during
    # forward, where neither a grad hook nor `.grad` writes reach the parameter: plain lookups there
    if mode is None or embedding.sparse or not weight.requires_grad or not weight.is_leaf:
        yield
        return
    if mode == "in_place":
        anchor = torch.zeros((), device=weight.device, requires_grad=True)
        embedding.forward = lambda ids: _LookupIntoGrad.apply(ids, anchor, embedding)
        try:
            yield
        finally:
            del embedding.forward
        return
    if not getattr(weight, "_ofa_ufo_densify", False):
        weight.register_post_accumulate_grad_hook(_densify_grad)
        weight._ofa_ufo_densify = True
    embedding.sparse = True
    try:
        yield
    finally:
        embedding.sparse = False
