"""The model card (`README.md`) that `save_pretrained` writes beside the weights, as the Hugging Face
Hub expects one: YAML front matter, the model's tasks, its architecture, how to load it and, for a
model a training run exported, that run's config and held-out metrics.

A card carries `MARKER`; a `README.md` without it was written by someone else (by hand, or by
transformers' `push_to_hub`) and is never overwritten. Delete the marker line to keep your edits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.tasks import get_task

__all__ = ["CARD_NAME", "MARKER", "TrainingRecord", "card_is_replaceable", "render_model_card", "write_model_card"]

CARD_NAME = "README.md"
MARKER = "<!-- ofa_ufo model card: rewritten by save_pretrained; delete this line to keep your edits -->"
Metrics = dict[str, dict[str, float]]  # task -> metric name -> value


@dataclass
class TrainingRecord:
    """What a training run adds to its exported model's card."""

    config_yaml: str  # the run's train_config.yaml
    steps: int
    metrics_before: Metrics  # held-out metrics at step 0
    metrics_after: Metrics  # ... and after the last step


def _front_matter(config: OFAUFOConfig) -> str:
    """Hub metadata: every task is prompt (+ image) in, tokens out, hence image-text-to-text."""
    tags = ["ofa_ufo", "transformers", "ofa", "vision-language"]
    if config.vision_config.supernet_layers:
        tags.append("ufo-supernet")
    data = ModelCardData(library_name="ofa_ufo", pipeline_tag="image-text-to-text", tags=tags)
    return f"---\n{data.to_yaml()}\n---\n"


def _supernet(config: OFAUFOConfig) -> str:
    vision = config.vision_config
    if not vision.supernet_layers:
        return "none (exactly OFA)"
    kind = "routed by task" if vision.supernet_routed else f"extracted subnet for {vision.supernet_task!r}"
    return f"{vision.supernet_layers} blocks x d{vision.supernet_dim}, {vision.supernet_heads} heads, {kind}"


def _architecture(config: OFAUFOConfig) -> list[str]:
    rows = [
        ("d_model", config.d_model),
        ("layers (encoder / decoder)", f"{config.encoder_layers} / {config.decoder_layers}"),
        ("attention heads (encoder / decoder)", f"{config.encoder_attention_heads} / {config.decoder_attention_heads}"),
        ("FFN width (encoder / decoder)", f"{config.encoder_ffn_dim} / {config.decoder_ffn_dim}"),
        ("ResNet stem", config.vision_config.resnet_type),
        ("UFO supernet", _supernet(config)),
        ("image size", f"{config.image_size} px"),
        ("vocabulary", f"{config.vocab_size} ({config.num_codes} image codes, {config.num_bins} location bins)"),
        ("box mode", config.box_mode),
    ]
    if config.dense_head is not None:  # task dense_detection (docs/dense_detection.md)
        rows.append(("dense detection head", f"DAMO-YOLO {config.dense_head['preset']}, "
                                             f"{len(config.dense_head['labels'])} classes"))
    return ["## Architecture", "", "| field | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _usage(config: OFAUFOConfig, directory: str) -> list[str]:
    """Load and ask the model's first task (with the options it cannot do without), then plain `generate`."""
    task = config.vision_config.task_names[0]
    options = "".join(f", {name}={example}" for name, example in get_task(task).required.items())
    routed = config.vision_config.routes_tasks
    task_ids = f', task_ids=torch.tensor([model.config.vision_config.route_id("{task}")])' if routed else ""
    return [
        "## How to use", "",
        "```python",
        *(["import torch"] if routed else []),
        "from transformers import AutoModelForSeq2SeqLM, AutoProcessor, pipeline",
        "",
        "import ofa_ufo  # registers the \"ofa-ufo\" pipeline and the Auto classes",
        "",
        f'pipe = pipeline("ofa-ufo", model="{directory}")',
        f'print(pipe("photo.jpg", task="{task}"{options}))',
        "# other tasks: pipe(image, task=NAME, text=..., **options), as listed in ofa_ufo's docs/tasks.md",
        "",
        f'model = AutoModelForSeq2SeqLM.from_pretrained("{directory}")',
        f'processor = AutoProcessor.from_pretrained("{directory}")',
        'inputs = processor(images=["photo.jpg"], text=[" what does the image describe?"], return_tensors="pt")',
        f"tokens = model.generate(**inputs{task_ids}, num_beams=5, max_new_tokens=16)",
        "print(processor.batch_decode(tokens, skip_special_tokens=True))",
        "```",
    ]


def _metrics(record: TrainingRecord) -> list[str]:
    if not record.metrics_after:
        return ["No held-out evaluation in this run (`eval_examples: 0`)."]
    rows = ["Held-out metrics before and after training (`metrics.json`):", "",
            f"| task | metric | step 0 | step {record.steps} |", "|---|---|---|---|"]
    for task, values in record.metrics_after.items():
        before = record.metrics_before.get(task, {})
        rows += [f"| {task} | {name} | {before.get(name, float('nan')):.4g} | {value:.4g} |"
                 for name, value in values.items()]
    return rows


def _training(record: TrainingRecord) -> list[str]:
    return ["## Training", "", f"{record.steps} steps with this config (`train_config.yaml`):", "",
            "```yaml", record.config_yaml.rstrip("\n"), "```", "", "## Metrics", "", *_metrics(record)]


def render_model_card(config: OFAUFOConfig, directory: str, training: TrainingRecord | None = None) -> str:
    """The card's text for a model of `config` saved in `directory`."""
    tasks = ", ".join(f"`{name}`" for name in config.vision_config.task_names)
    lines = [MARKER, "", "# OFA-UFO model", "",
             ("An OFA-style vision-language encoder-decoder (prompt + image in, tokens out), "
              "saved by the `ofa_ufo` library."), "",
             f"Tasks: {tasks}.", "", *_architecture(config), "", *_usage(config, directory)]
    if training is not None:
        lines += ["", *_training(training)]
    return str(ModelCard(_front_matter(config) + "\n".join(lines) + "\n"))


def card_is_replaceable(directory: str | os.PathLike) -> bool:
    """Whether `directory` has no README.md, or one this library wrote (it carries `MARKER`)."""
    path = Path(directory) / CARD_NAME
    return not path.exists() or MARKER in path.read_text(encoding="utf-8", errors="replace")


def write_model_card(
    directory: str | os.PathLike, config: OFAUFOConfig, training: TrainingRecord | None = None
) -> bool:
    """Write `directory/README.md` unless a README this library did not write is there (it is kept).
    Returns whether the card was written."""
    if not card_is_replaceable(directory):
        return False
    (Path(directory) / CARD_NAME).write_text(render_model_card(config, str(directory), training), encoding="utf-8")
    return True
