"""Locate the data tables that ship with the package: `prompts/` and `tasks/` of the repository.

In a wheel they are the subpackages `ofa_ufo.resources.prompts` and `ofa_ufo.resources.task_specs`
(setup.py maps the top-level folders there); in a source checkout they are read in place.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_FOLDERS = {"prompts": "prompts", "task_specs": "tasks"}


def resource_dir(name: str) -> Path:
    """Directory of the `prompts` or `task_specs` tables, wherever the package is installed."""
    if name not in _FOLDERS:
        raise KeyError(f"unknown resource {name!r}; expected one of {sorted(_FOLDERS)}")
    try:
        path = Path(str(importlib.resources.files(f"{__name__}.{name}")))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    path = Path(__file__).resolve().parents[2] / _FOLDERS[name]
    if not path.is_dir():
        raise FileNotFoundError(f"resource folder {name!r} not found (looked for {path})")
    return path
