"""Free (zero-shot) prompts: the prompt string is used as given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ofa_ufo.core.prompts import DEFAULT_STYLE
from ofa_ufo.tasks.base import Task


@dataclass
class FreePromptTask(Task):
    """Any prompt string as given (zero-shot use); OFA prompts start with a space.

    Option `text_only` (default True): the answer is text, without `<code_N>` / `<bin_N>` tokens.
    `text_only=False` lets the model answer with them (e.g. a hand-written grounding prompt, whose
    answer then holds the raw `<bin_N>` tokens).
    """

    options: tuple[str, ...] = ("text_only",)

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        if not isinstance(options.get("text_only", True), bool):
            raise TypeError(f"text_only must be True or False, got {options['text_only']!r}")

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        if not text:
            raise ValueError("a free prompt needs prompt='...'")
        return text

    def generate_kwargs(self, config, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        if options.get("text_only", True):
            return super().generate_kwargs(config, tokenizer, options)
        return dict(self.generation)
