"""Declarative benchmark specs (top-level `tasks/`, one YAML file per benchmark), validated on load.

A spec names its data source and column mapping, the registered task, the prompt style,
decoding settings, metric and default hyperparameters. Unknown keys are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ofa_ufo.core.prompts import DEFAULT_STYLE, list_styles
from ofa_ufo.data.sources import DataSourceError, source_of
from ofa_ufo.metrics import list_metrics
from ofa_ufo.resources import resource_dir
from ofa_ufo.tasks import get_task


@dataclass(frozen=True)
class TaskSpec:
    name: str
    task: str
    data: dict[str, Any]
    metric: str = ""  # default: the task's own metric
    prompt_style: str = DEFAULT_STYLE
    generation: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def list_specs() -> list[str]:
    """Names of the specs shipped in `tasks/`."""
    return sorted(p.stem for p in resource_dir("task_specs").glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> TaskSpec:
    """Load and validate a shipped spec by name, or any spec file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = resource_dir("task_specs") / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"Unknown task spec {str(name_or_path)!r}. Available: {', '.join(list_specs())}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a task spec must be a YAML mapping, got {type(raw).__name__}")
    return _validate(raw, path)


def _validate(raw: dict[str, Any], path: Path) -> TaskSpec:
    known = {f.name for f in fields(TaskSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    missing = sorted(f.name for f in fields(TaskSpec) if f.name in ("name", "task", "data") and f.name not in raw)
    if missing:
        raise ValueError(f"{path}: missing required key(s) {missing}")
    try:
        task = get_task(raw["task"])
    except ValueError as error:
        raise ValueError(f"{path}: field 'task': {error}") from None
    raw = {**raw, "metric": raw.get("metric") or task.metric}
    if raw.get("prompt_style", DEFAULT_STYLE) not in list_styles():
        raise ValueError(f"{path}: field 'prompt_style' must be one of {list_styles()}, got {raw['prompt_style']!r}")
    if raw["metric"] not in list_metrics():
        raise ValueError(f"{path}: field 'metric' must be one of {list_metrics()}, got {raw['metric']!r}")
    _check_data(raw["data"], path)
    return TaskSpec(**raw)


def _check_data(data: Any, path: Path) -> None:
    """`data` names a registered source: generated demo data or a dataset format (`ofa_ufo.data.sources`)."""
    try:
        source_of(data)
    except DataSourceError as error:
        raise ValueError(f"{path}: field {error}") from None
