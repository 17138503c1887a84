"""Closed-set identification for the embedding tasks: the training identities' CosFace classes,
shipped next to an exported model as `identities.safetensors`.

A CosFace head's class-weight rows are the identities' prototypes in the BNNeck's output space.
Exporting them (with the BNNeck's running statistics and the identity names) lets the pipeline
name the training identity an image shows: ``pipe(image, task="face", identify=True)`` ->
``{"embedding": [...], "identity": "alice", "score": 0.93}``, where the score is the softmax
probability of the CosFace logits (scale x cosine, no margin). Open-set retrieval keeps using the
embedding alone (`ofa_ufo.metrics.retrieval`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["IDENTITIES_FILE", "IdentityClassifier", "identity_label", "load_identities", "save_identities"]

IDENTITIES_FILE = "identities.safetensors"
_TENSORS = ("weight", "mean", "var", "gamma", "beta")


def identity_label(identity: Hashable) -> str:
    """A training identity `(dataset, identity)` as text: "identity", or "dataset/identity" when the
    dataset is named (identities of merged datasets stay distinct)."""
    if isinstance(identity, tuple) and len(identity) == 2:
        dataset, name = identity
        return str(name) if dataset is None else f"{dataset}/{name}"
    return str(identity)


@dataclass
class IdentityClassifier:
    """One task's closed set: `weight` (C, D) class prototypes, BNNeck statistics (D,) and names."""

    labels: list[str]
    weight: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    scale: float
    eps: float = 1e-5

    def __post_init__(self) -> None:
        classes, dim = self.weight.shape
        if len(self.labels) != classes:
            raise ValueError(f"{len(self.labels)} identity names for {classes} class rows")
        for name in ("mean", "var", "gamma", "beta"):
            if getattr(self, name).shape != (dim,):
                raise ValueError(f"BNNeck {name} has shape {tuple(getattr(self, name).shape)}, expected ({dim},)")

    @classmethod
    def from_head(cls, head) -> IdentityClassifier:
        """From a trained `ofa_ufo.layers.metric_learning.CosFaceHead` (BNNeck in eval mode: running
        stats); class k is named after the head's k-th identity (`identity_label`)."""
        dim = head.weight.shape[1]
        neck = head.neck
        ones, zeros = torch.ones(dim), torch.zeros(dim)
        stats = (neck.running_mean, neck.running_var, neck.weight, neck.bias) if neck is not None else (zeros, ones, ones, zeros)
        mean, var, gamma, beta = (t.detach().float().cpu().clone() for t in stats)
        labels = [identity_label(identity) for identity in head.class_index]  # insertion order = row order
        return cls(labels, head.weight.detach().float().cpu().clone(), mean, var, gamma, beta,
                   float(head.scale), float(neck.eps) if neck is not None else 0.0)

    def classify(self, features: torch.Tensor, top_k: int = 1) -> list[list[tuple[str, float]]]:
        """Raw (un-normalised) read-outs (B, D) -> per row the `top_k` (name, probability), best first."""
        if features.ndim != 2 or features.shape[1] != self.weight.shape[1]:
            raise ValueError(f"features of shape {tuple(features.shape)} do not match {self.weight.shape[1]}-dim "
                             "identity prototypes (a classifier exported from another model?)")
        features = features.detach()
        x = (features.float().cpu() - self.mean) / torch.sqrt(self.var + self.eps) * self.gamma + self.beta
        logits = self.scale * F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T  # (B, C)
        probs, index = logits.softmax(dim=1).topk(min(top_k, len(self.labels)), dim=1)
        return [[(self.labels[i], float(p)) for p, i in zip(row_p, row_i)] for row_p, row_i in zip(probs, index)]


def save_identities(directory: str | os.PathLike, classifiers: dict[str, IdentityClassifier]) -> Path:
    """Write every task's classifier into `<directory>/identities.safetensors` (names and scalars in
    the file's metadata, so nothing but tensors and JSON is ever read back)."""
    tensors = {f"{task}.{name}": getattr(c, name).contiguous() for task, c in classifiers.items() for name in _TENSORS}
    meta = {task: {"labels": c.labels, "scale": c.scale, "eps": c.eps} for task, c in classifiers.items()}
    path = Path(directory) / IDENTITIES_FILE
    save_file(tensors, str(path), metadata={"identities": json.dumps(meta)})
    return path


def load_identities(directory: str | os.PathLike) -> dict[str, IdentityClassifier]:
    """Every task's classifier in `<directory>/identities.safetensors`; {} when there is none."""
    path = Path(directory) / IDENTITIES_FILE
    return dict(_load(str(path.resolve()), path.stat().st_mtime_ns)) if path.is_file() else {}


@lru_cache(maxsize=4)
def _load(path: str, mtime: int) -> tuple[tuple[str, IdentityClassifier], ...]:
    with safe_open(path, framework="pt") as handle:
        raw = (handle.metadata() or {}).get("identities")
    if raw is None:
        raise ValueError(f"{path} has no 'identities' metadata: not written by ofa_ufo's save_identities")
    tensors = load_file(path)
    out = []
    for task, meta in json.loads(raw).items():
        missing = [f"{task}.{n}" for n in _TENSORS if f"{task}.{n}" not in tensors]
        if missing:
            raise ValueError(f"{path} lacks tensors {missing}")
        out.append((task, IdentityClassifier(meta["labels"], *(tensors[f"{task}.{n}"] for n in _TENSORS),
                                             scale=float(meta["scale"]), eps=float(meta["eps"]))))
    return tuple(out)
