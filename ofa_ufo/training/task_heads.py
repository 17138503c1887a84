"""Training-only heads that tasks ask for: feature heads (`Task.training_head`, e.g. CosFace over an
embedding task's identities) and auxiliary-loss heads (`Task.auxiliary`, e.g. grounding's box mask).

The trainer optimises them with the model and keeps them in each checkpoint's trainer state (feature
heads under "heads", an auxiliary head under its `AuxiliaryLoss.state_key`); only the feature heads'
identities reach the exported model (`ofa_ufo.training.outputs`). A task may also train a head that is part
of the model (`Task.model_head`, e.g. the dense detector): its rows then go through `Task.model_outputs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ofa_ufo.data.demo_scenes import COLORS, SHAPES
from ofa_ufo.tasks import get_task
from ofa_ufo.training.config import ConfigError, TrainConfig


def build_heads(sources: dict[str, Any], dim: int) -> torch.nn.ModuleDict:
    """Feature heads (task -> head) of the tasks that have one, over their training examples."""
    heads = {}
    for task, source in sources.items():
        head = get_task(task).training_head(getattr(source, "examples", ()), dim)
        if head is not None:
            heads[task] = head
    return torch.nn.ModuleDict(heads)


def build_auxiliary_heads(config: TrainConfig, dim: int) -> torch.nn.ModuleDict:
    """Heads (task -> head) of the configured tasks' auxiliary losses that the config weights (> 0)."""
    heads, keys = {}, {}
    for name in config.tasks:
        auxiliary = get_task(name).auxiliary
        if auxiliary is None or not getattr(config, auxiliary.weight_field):
            continue
        if auxiliary.state_key in keys:  # both would be saved under one key
            raise ConfigError(f"tasks {keys[auxiliary.state_key]!r} and {name!r} share the auxiliary loss "
                              f"{auxiliary.name!r}: train one of them per run")
        keys[auxiliary.state_key] = name
        heads[name] = get_task(name).auxiliary_head(dim)
    return torch.nn.ModuleDict(heads)


def add_auxiliary_losses(loss: torch.Tensor, heads: torch.nn.ModuleDict, config: TrainConfig,
                         encoder_states: torch.Tensor, pixel_values: torch.Tensor | None,
                         examples: list[dict[str, Any]]) -> torch.Tensor:
    """`loss` (the summed token loss) plus each auxiliary loss, summed like it and weighted by its field."""
    for name, head in heads.items():
        task = get_task(name)
        weight = getattr(config, task.auxiliary.weight_field)
        loss = loss + weight * task.auxiliary_loss(head, encoder_states, pixel_values, examples)
    return loss


def auxiliary_head_states(auxiliary_heads: torch.nn.ModuleDict) -> dict[str, Any]:
    """The auxiliary heads' entries of a checkpoint's trainer state (the feature heads' is "heads")."""
    return {get_task(name).auxiliary.state_key: head.state_dict() for name, head in auxiliary_heads.items()}


def load_head_states(heads: torch.nn.ModuleDict, auxiliary_heads: torch.nn.ModuleDict, state: dict[str, Any],
                     path: Path, tasks: list[str]) -> None:
    """Restore the heads from checkpoint `path`'s trainer state; ConfigError when an auxiliary loss of
    one of `tasks` was on in the checkpoint and is off in this run, or the other way round."""
    heads.load_state_dict(state.get("heads", {}))
    for name in tasks:
        auxiliary = get_task(name).auxiliary
        if auxiliary is None:
            continue
        trained = auxiliary.state_key in state
        if trained != (name in auxiliary_heads):
            raise ConfigError(f"checkpoint {path} was trained {'with' if trained else 'without'} the {name} "
                              f"{auxiliary.name} loss: resume with the run's own {auxiliary.weight_field!r} (0 or not)")
        if trained:
            auxiliary_heads[name].load_state_dict(state[auxiliary.state_key])


def sync_head_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average the heads' gradients over processes (they sit outside the DDP-wrapped model)."""
    if accelerator.num_processes > 1:
        for param in params:
            if param.grad is not None:
                param.grad = accelerator.reduce(param.grad, reduction="mean")


def demo_class_names() -> list[str]:
    """Every detection label a generated demo scene can hold ("colour shape", `SceneObject.name`)."""
    return [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def source_class_names(source: Any) -> list[str] | None:
    """The detection labels of a task's training source: the demo scenes' whole vocabulary, else the
    sorted labels of its examples (a spec's category names, a `.jsonl` file's labels); None for a source
    that cannot list them ahead (a stream)."""
    if hasattr(source, "scenes"):
        return demo_class_names()
    examples = getattr(source, "examples", None)
    if examples is None:
        return None
    return sorted({label for example in examples for label in example.get("labels") or ()})


def model_head_overrides(config: TrainConfig, sources: dict[str, Any]) -> dict[str, Any]:
    """Model config fields the run's tasks need (`Task.model_head`, e.g. dense_detection's `dense_head`
    over its data's classes), for the tasks trained through `Task.model_outputs`."""
    overrides: dict[str, Any] = {}
    for name, source in sources.items():
        task = get_task(name)
        if task.model_loss_weight:
            options = {option: getattr(config, option) for option in task.source_options}
            try:
                overrides.update(task.model_head(source_class_names(source), options))
            except ValueError as error:
                raise ConfigError(f"task {name!r}: {error}") from None
    return overrides


def split_rows(examples: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(rows trained through the decoder's tokens, rows trained through their task's `model_outputs`)."""
    direct = [bool(get_task(example["task"]).model_loss_weight) for example in examples]
    return [i for i, d in enumerate(direct) if not d], [i for i, d in enumerate(direct) if d]


def batch_rows(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """The rows of a padded batch (every entry is (B, ...))."""
    index = torch.tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
    return {key: value[index.to(value.device)] for key, value in batch.items()}


def model_losses(model, config: TrainConfig, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]],
                 distiller: Any = None, step: int = 0) -> torch.Tensor:
    """Sum over the tasks trained through `Task.model_outputs` of its weight field x the task's mean loss on
    its rows (`batch` and `examples` hold only such rows), plus, with a `distiller`, its weighted feature
    loss on those outputs (e.g. CWD of the dense neck)."""
    total = batch["pixel_values"].new_zeros((), dtype=torch.float32)
    for name in dict.fromkeys(example["task"] for example in examples):
        task = get_task(name)
        rows = [i for i, example in enumerate(examples) if example["task"] == name]
        part, part_examples = batch_rows(batch, rows), [examples[i] for i in rows]
        outputs = task.model_outputs(model, part, part_examples)
        total = total + getattr(config, task.model_loss_weight) * outputs["loss"].float()
        if distiller is not None:
            total = total + distiller.model_output_loss(outputs, part, part_examples, step)
    return total
