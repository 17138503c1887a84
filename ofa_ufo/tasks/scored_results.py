"""Scores that say what they are over: a task's metric over the examples that got an answer, with the
examples that failed (an `{"error": ...}` record from the pipeline: an unreadable image, a missing file)
counted and kept apart instead of scored as wrong answers.

Without this, a run whose every image is missing reports `vqa_accuracy 0.0000`, which reads like a model
that answers everything wrong. `python -m ofa_ufo.evaluate` and the trainer's held-out evaluation both
score through `score_results`, and refuse a result when too many examples failed (`ScoredResults.problem`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ofa_ufo.metrics import get_metric
from ofa_ufo.tasks.base import Task

__all__ = ["DEFAULT_MAX_FAILURES", "SHOWN_ERRORS", "ScoredResults", "check_share", "score_results"]

DEFAULT_MAX_FAILURES = 0.05  # the share of examples that may fail before `python -m ofa_ufo.evaluate` exits 1
SHOWN_ERRORS = 5  # failures kept with their message and example id (all of them stay in a predictions file)


@dataclass
class ScoredResults:
    """A metric over the `scored` examples, and the `failed` ones with the first `SHOWN_ERRORS` errors."""

    values: dict[str, float]  # the metric's values over the scored examples; {} when none was scored
    scored: int
    failed: int
    errors: list[dict[str, str]] = field(default_factory=list)  # [{"id": example id, "error": message}, ...]

    @property
    def total(self) -> int:
        return self.scored + self.failed

    def counts(self) -> str:
        """"98 scored, 2 failed": what a table or log line shows beside the metric."""
        return f"{self.scored} scored, {self.failed} failed"

    def error_lines(self) -> list[str]:
        """One line per kept error: "example ID: message"."""
        return [f"example {error['id']}: {error['error']}" for error in self.errors]

    def problem(self, max_failures: float) -> str | None:
        """Why the values must not stand as a result: every example failed (there is no metric), or more than
        `max_failures` (a share of all examples) did; None when they may."""
        if self.total and self.failed == self.total:
            return f"every example failed ({self.failed} of {self.total}): there is no metric"
        if self.failed > max_failures * self.total:
            return (f"{self.failed} of {self.total} examples failed ({self.failed / self.total:.1%}), more than "
                    f"the {max_failures:.1%} allowed")
        return None

    def record(self) -> dict[str, Any]:
        """The counts and kept errors as JSON-ready data (training history, metrics.json)."""
        return {"scored": self.scored, "failed": self.failed, "errors": [dict(error) for error in self.errors]}


def check_share(value: float, name: str = "max_failures") -> float:
    """A share of examples: a number in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a share of the examples, a number in [0, 1]; got {value}")
    return float(value)


def score_results(task: Task, metric: str, examples: Sequence[dict[str, Any]],
                  results: Sequence[dict[str, Any]]) -> ScoredResults:
    """Score pipeline `results` (one per example; `{"error": ...}` for one that failed) with `metric` over the
    examples that got an answer. A failed example is counted and its error kept, not scored as a wrong answer:
    a retrieval metric could not score a missing embedding at all, and a metric over failures hides them."""
    if len(results) != len(examples):
        raise ValueError(f"{len(results)} results for {len(examples)} examples")
    pairs, errors = [], []
    for index, (result, example) in enumerate(zip(results, examples)):
        if "error" in result:
            errors.append({"id": str(example.get("id", index)), "error": str(result["error"])})
        else:
            pairs.append(task.metric_pair(result, example))
    values = get_metric(metric)([p for p, _ in pairs], [r for _, r in pairs]) if pairs else {}
    return ScoredResults(values, len(pairs), len(errors), errors[:SHOWN_ERRORS])
