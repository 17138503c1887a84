"""Prompt tables (top-level `prompts/`, one JSON file per style, task -> template).

OFA's strings are kept verbatim as style `ofa` (leading spaces matter for GPT-2 BPE).
"""

from __future__ import annotations

import json
import string
from functools import lru_cache

from ofa_ufo.resources import resource_dir

DEFAULT_STYLE = "ofa"


def list_styles() -> list[str]:
    return sorted(p.stem for p in resource_dir("prompts").glob("*.json"))


@lru_cache(maxsize=None)
def prompt_table(style: str = DEFAULT_STYLE) -> dict[str, str]:
    path = resource_dir("prompts") / f"{style}.json"
    if not path.is_file():
        raise ValueError(f"Unknown prompt style {style!r}. Available: {', '.join(list_styles())}")
    return json.loads(path.read_text(encoding="utf-8"))


def format_prompt(task: str, style: str = DEFAULT_STYLE, **fields: str) -> str:
    """Fill the template of `task` in `style`; a missing field is named in the error."""
    table = prompt_table(style)
    if task not in table:
        raise ValueError(f"Prompt style {style!r} has no prompt for task {task!r}; it covers {sorted(table)}")
    template = table[task]
    needed = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = sorted(needed - {k for k, v in fields.items() if v is not None})
    if missing:
        raise ValueError(f"Task {task!r} needs {missing} for its prompt {template!r}")
    return template.format(**fields)
