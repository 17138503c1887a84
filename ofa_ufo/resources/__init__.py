"""Locate the data tables that ship with the package: `prompts/` and `tasks/` of the repository.

In a wheel they sit in `ofa_ufo/resources/prompts` and `ofa_ufo/resources/task_specs` (setup.py
maps the top-level folders there); in a source checkout they are read in place.
"""

from __future__ import annotations

from pathlib import Path

_FOLDERS = {"prompts": "prompts", "task_specs": "tasks"}


def resource_dir(name: str) -> Path:
    """Directory of the `prompts` or `task_specs` tables, wherever the package is installed."""
    if name not in _FOLDERS:
        raise KeyError(f"unknown resource {name!r}; expected one of {sorted(_FOLDERS)}")
    here = Path(__file__).resolve().parent
    for path in (here / name, here.parents[1] / _FOLDERS[name]):
        if path.is_dir():
            return path
    raise FileNotFoundError(f"resource folder {name!r} not found next to {here} or in the source tree")
