"""Top-k accuracy for classification-as-generation: the gold label must be in the first k guesses."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["topk_accuracy"]


def _ranked(prediction: Hashable | Sequence[Hashable]) -> Sequence[Hashable]:
    """A bare label (a string is one label, not a sequence of characters) is a ranking of one."""
    if isinstance(prediction, (str, bytes)) or not isinstance(prediction, Sequence):
        return [prediction]
    return prediction


def topk_accuracy(
    predictions: Sequence[Hashable | Sequence[Hashable]], references: Sequence[Hashable], k: int = 1
) -> dict[str, float]:
    """Share of samples whose gold label is among the first ``k`` of its best-first ranking."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("topk_accuracy needs at least one sample")
    hits = sum(gold in _ranked(pred)[:k] for pred, gold in zip(predictions, references))
    return {f"top{k}": hits / len(predictions)}
