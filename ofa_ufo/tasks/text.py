"""Tasks whose answer is free text: captioning, VQA and free (zero-shot) prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ofa_ufo.prompts import DEFAULT_STYLE
from ofa_ufo.tasks.base import Task


@dataclass
class VQATask(Task):
    """The question itself is the prompt (OFA); a trailing '?' is ensured."""

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        if not text or not text.strip():
            raise ValueError("task 'vqa' needs a question: pass text='...'")
        question = self.normalize(text)
        return super().prompt(question if question.endswith("?") else question + "?", style)

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        return self.prompt(example["question"], style), " " + self.normalize(example["answer"])


@dataclass
class FreePromptTask(Task):
    """Any prompt string as given (zero-shot use); OFA prompts start with a space."""

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        if not text:
            raise ValueError("a free prompt needs prompt='...'")
        return text
