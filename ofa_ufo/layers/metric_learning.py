"""Metric-learning losses of the AllInOne embedding tasks (face, person / vehicle ReID, product).

* :class:`CosFaceHead` / :func:`cosface_logits`: large-margin cosine classification over the
  training identities (CosFace, Wang et al. 2018), one class-weight matrix per task.
* :func:`batch_hard_triplet_loss`: soft-margin batch-hard triplet loss on P x K batches
  (Hermans et al. 2017), as the UFO AllInOne ReID heads use it.

Per-task settings follow UFO AllInOne / OneForAll (see `ofa_ufo.tasks.embedding`): CosFace
scale / margin face 50 / 0.3, person 30 / 0.2, vehicle 20 / 0.2, product 30 / 0.2; triplet for
person, vehicle and product (weight 1), CosFace only for face; K = 4 images per identity.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CosFaceHead", "batch_hard_triplet_loss", "cosface_logits", "cosface_loss", "pairwise_distances"]


def cosface_logits(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None, scale: float,
                   margin: float) -> torch.Tensor:
    """CosFace logits ``s * (cos(theta_j) - m * [j == y])``: (B, D) features, (C, D) class weights -> (B, C).

    ``cos(theta_j) = <f / |f|, w_j / |w_j|>``: features and class weights are L2-normalised, so only
    angles matter. The margin ``m`` is subtracted from the target class's cosine only (``labels``
    (B,) class indices; None: no margin, as at test time), then every logit is scaled by ``s``.
    The target logit is therefore exactly ``s * m`` lower than without the margin.
    """
    with torch.autocast(features.device.type, enabled=False):  # fp32: s * cos needs the precision
        cosine = F.normalize(features.float(), dim=-1) @ F.normalize(weight.float(), dim=-1).T  # (B, C)
    if labels is not None:
        cosine = cosine - margin * F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
    return scale * cosine


def cosface_loss(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float,
                 margin: float) -> torch.Tensor:
    """Mean cross-entropy of :func:`cosface_logits`:
    ``-log( e^{s(cos_y - m)} / (e^{s(cos_y - m)} + sum_{j != y} e^{s cos_j}) )`` over the batch."""
    return F.cross_entropy(cosface_logits(features, weight, labels, scale, margin), labels)


class CosFaceHead(nn.Module):
    """One task's class-weight matrix (num_classes, dim), one row per training identity in
    `classes`, with the task's CosFace scale and margin. Weights start as N(0, 0.001) (AllInOne);
    used in training only (retrieval compares embeddings, not classes).

    `neck` (default): AllInOne's BNNeck, a BatchNorm over the task's rows (weight 1, bias frozen at 0)
    between the read-out and the cosine classifier. It standardises every feature dimension over the
    batch, so the classifier sees the input-dependent part of the read-out even while a constant part
    dominates it (a fresh model's decoder read-out varies by ~1% between images), and the loss cannot
    be lowered by shrinking that variation towards a constant output: without it a tiny model trained
    from scratch collapses to one embedding for every image (docs/retrieval.md)."""

    def __init__(self, classes: Sequence[Hashable], dim: int, scale: float, margin: float, neck: bool = True) -> None:
        super().__init__()
        self.class_index = {identity: i for i, identity in enumerate(classes)}
        if len(self.class_index) < 2:
            raise ValueError(f"CosFace needs at least 2 identities, got {len(self.class_index)}")
        self.scale, self.margin = scale, margin
        self.weight = nn.Parameter(torch.randn(len(self.class_index), dim) * 0.001)
        self.neck = nn.BatchNorm1d(dim) if neck else None
        if self.neck is not None:
            self.neck.bias.requires_grad_(False)  # BNNeck: no shift (Luo et al. 2019, AllInOne)

    def labels(self, identities: Sequence[Hashable]) -> torch.Tensor:
        """Class indices (B,) of identities; one outside the training identities is an error."""
        unknown = [i for i in identities if i not in self.class_index]
        if unknown:
            raise ValueError(f"identities {unknown[:3]} are not among the head's {len(self.class_index)} classes")
        return torch.tensor([self.class_index[i] for i in identities], dtype=torch.long)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) features, (B,) class indices -> mean CosFace loss (on the BNNeck's output when it has
        one; a single row is normalised by the running statistics, a batch needs two)."""
        if self.neck is not None:
            with torch.autocast(features.device.type, enabled=False):
                neck = self.neck
                features = F.batch_norm(features.float(), neck.running_mean, neck.running_var, neck.weight, neck.bias,
                                        neck.training and len(features) > 1, neck.momentum, neck.eps)
        return cosface_loss(features, self.weight, labels, self.scale, self.margin)

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, s={self.scale}, m={self.margin}"


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``|f_i - f_j|_2`` of (B, D) features -> (B, B); clamped at 1e-12 before
    the square root so the zero diagonal has a finite gradient (as fast-reid)."""
    with torch.autocast(features.device.type, enabled=False):
        features = features.float()
        squared = features.pow(2).sum(-1)
        gram = features @ features.T  # (B, B)
        return (squared[:, None] + squared[None, :] - 2 * gram).clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Batch-hard triplet loss over (B, D) un-normalised features with (B,) identity labels.

    For each anchor ``a``: ``d_ap = max_{p != a, y_p = y_a} d(a, p)`` (hardest positive) and
    ``d_an = min_{y_n != y_a} d(a, n)`` (hardest negative), with Euclidean ``d``.
    ``margin == 0`` (the AllInOne setting) is the soft-margin form
    ``mean_a log(1 + exp(d_ap - d_an))``; ``margin > 0`` the hinge ``mean_a max(0, d_ap - d_an + margin)``.
    Anchors without another image of their identity, or without any other identity, in the batch
    are left out of the mean (P x K sampling with K >= 2 gives every anchor both); a batch with
    no usable anchor gives a zero loss that still backpropagates.
    """
    distances = pairwise_distances(features)  # (B, B)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    usable = positive.any(1) & (~same).any(1)
    if not usable.any():
        return features.sum() * 0.0
    hardest_positive = distances.masked_fill(~positive, float("-inf")).amax(1)[usable]
    hardest_negative = distances.masked_fill(same, float("inf")).amin(1)[usable]
    gap = hardest_positive - hardest_negative
    return (F.softplus(gap) if margin == 0 else F.relu(gap + margin)).mean()
