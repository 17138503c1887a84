"""Free (zero-shot) prompts: the prompt string is used as given."""

from __future__ import annotations

from dataclasses import dataclass

from ofa_ufo.core.prompts import DEFAULT_STYLE
from ofa_ufo.tasks.base import Task


@dataclass
class FreePromptTask(Task):
    """Any prompt string as given (zero-shot use); OFA prompts start with a space."""

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        if not text:
            raise ValueError("a free prompt needs prompt='...'")
        return text
