"""The task interface: one object per task owns its prompt, decoding settings and output parsing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ofa_ufo.prompts import DEFAULT_STYLE, format_prompt


@dataclass
class Decoded:
    """One generated answer: token ids after the start token (no padding) and its total log-probability."""

    tokens: list[int]
    logprob: float

    @property
    def probability(self) -> float:
        return math.exp(self.logprob)


@dataclass
class Task:
    """Base task: text in, text out. Subclasses override what differs."""

    name: str
    generation: dict[str, Any] = field(default_factory=dict)

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        return format_prompt(self.name, style, text=self.normalize(text) if text is not None else None)

    @staticmethod
    def normalize(text: str) -> str:
        """OFA-style light normalisation: lower case, single spaces."""
        return " ".join(text.lower().split())

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        """Training pair (prompt, target) from an example dict; targets start with a space (OFA)."""
        return self.prompt(example.get("text"), style), " " + self.normalize(example["target"])

    def generate_kwargs(self, config, tokenizer) -> dict[str, Any]:
        """Decoding settings for `model.generate` (callers may override any of them)."""
        return dict(self.generation)

    def postprocess(self, decoded: Decoded, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        text = tokenizer.decode(decoded.tokens, skip_special_tokens=True).strip()
        return {"text": text, "score": decoded.probability}
