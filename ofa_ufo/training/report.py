"""What a run shows: per-task metrics on held-out examples, the before/after table, the loss plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import pipeline

from ofa_ufo.data.real_photos import load_real_photos, photo_labels
from ofa_ufo.data.sources import decoding_options
from ofa_ufo.hf.pipeline import OFAUFOPipeline
from ofa_ufo.tasks import get_task
from ofa_ufo.tasks.scored_results import ScoredResults, check_share, score_results
from ofa_ufo.training.mixture import build_batch
from ofa_ufo.training.step_batches import TrainingError


def evaluate_model(model, processor, spec, examples: list[dict[str, Any]], batch_size: int = 16,
                   max_failures: float = 1.0) -> ScoredResults:
    """Score `model` (in memory) on `examples` the way `ofa_ufo.evaluate` scores a saved one: the metric over
    the examples that got an answer, with the failed ones (an unreadable image) counted and the first errors
    kept. A `TrainingError` when every example fails, or more than `max_failures` of them (a share; the
    default 1.0 refuses only a task with no scored example, whose metric would be a silent zero)."""
    check_share(max_failures)
    task = get_task(spec.task)
    labels = spec.data.get("labels") or sorted({e["target"] for e in examples if e.get("target")})
    generation = {**spec.generation, **decoding_options(spec.data)}  # e.g. VQA's answer trie (data.answers)
    pipe = OFAUFOPipeline(model=model, processor=processor, tokenizer=processor.tokenizer,
                          image_processor=processor.image_processor)
    calls: dict[str, Any] = {}
    for index, example in enumerate(examples):  # group examples that share call options into batches
        options = task.pipeline_call(example, labels)
        key = repr(sorted((k, v) for k, v in options.items() if k != "text"))
        calls.setdefault(key, []).append((index, options))
    results: list[Any] = [None] * len(examples)
    for group in calls.values():
        options = {k: v for k, v in group[0][1].items() if k != "text"}
        texts = [o.get("text") for _, o in group]
        text = texts if any(t is not None for t in texts) else None
        outputs = pipe([examples[i]["image"] for i, _ in group], task=spec.task, text=text,
                       style=spec.prompt_style, batch_size=batch_size, **generation, **options)
        for (i, _), output in zip(group, outputs):
            results[i] = output
    scored = score_results(task, spec.metric, examples, results)
    problem = scored.problem(max_failures)
    if problem:
        raise TrainingError(f"held-out evaluation of task {spec.task!r} ({spec.name}): {problem}; first errors: "
                            f"{'; '.join(scored.error_lines())}. Fix its held-out data (eval_data or data) or set "
                            "eval_examples=0")
    return scored


def encoder_image_signal(model, processor, examples: list[dict[str, Any]]) -> float | None:
    """How much of the encoder's output at image positions differs between images: the spread
    across the examples (std over the batch, averaged over positions and channels) divided by
    the output's total std. About 0.1 at random init; near 0 means the encoder has stopped
    carrying the image and the decoder answers from the prompt alone (see docs/training.md).
    None when fewer than two examples have an image."""
    examples = [e for e in examples if e.get("image") is not None][:32]
    if len(examples) < 2:
        return None
    batch = build_batch(processor, examples, model.config)
    with torch.no_grad():
        encoder = model.get_encoder()
        states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], image_mask=batch["image_mask"],
                         task_ids=batch["task_ids"]).last_hidden_state  # (B, N_image + T, D)
        tokens = encoder.embed_images(batch["pixel_values"][:1]).shape[-2:].numel()  # image positions N
        image = states[:, :tokens].float()  # (B, N, D)
        return float(image.std(0).mean() / image.std().clamp_min(1e-12))


def headline(task: str, values: dict[str, float]) -> tuple[str, float] | None:
    """(name, value) of the figure `task` is judged by in the table (`Task.headline`, else the first);
    every value goes to metrics.json."""
    name = get_task(task).headline
    if name in values:
        return name, values[name]
    return next(iter(values.items()), None)


def format_metric_table(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                        start: str = "untrained", examples: dict[str, dict[str, Any]] | None = None,
                        blind: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown table: one row per task, its headline metric at the start (`start`: "untrained"
    for a fresh preset, "start" for a loaded checkpoint) vs after training. With `blind` (the trained
    model scored with constant images), a column of that prompt-only baseline. With `examples` (task ->
    the last evaluation's `ScoredResults.record()`), a last column says what the trained metric is over:
    "n scored, k failed" (a failed example, e.g. an unreadable image, is not in the metric)."""
    examples = examples or {}
    rows = [f"| task | metric | {start} | trained |" + (" trained, blind (constant image) |" if blind else "")
            + (" held-out examples |" if examples else ""),
            "|---|---|---|---|" + ("---|" if blind else "") + ("---|" if examples else "")]
    for task, values in after.items():
        name, value = headline(task, values) or ("-", float("nan"))
        row = f"| {task} | {name} | {before.get(task, {}).get(name, float('nan')):.3f} | {value:.3f} |"
        if blind:
            row += f" {blind.get(task, {}).get(name, float('nan')):.3f} |"
        if examples:
            counts = examples.get(task)
            row += f" {counts['scored']} scored, {counts['failed']} failed |" if counts else " - |"
        rows.append(row)
    return "\n".join(rows)


def plot_history(history: dict[str, Any], path: Path) -> None:
    """PNG with the training loss (left, with its parts under distillation) and each task's headline metric over
    evaluations (right)."""
    import matplotlib  # heavy, and needed only when a run ends

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # only after the backend is chosen

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    losses = history["losses"]
    left.plot(range(1, len(losses) + 1), losses, lw=0.8, label="loss")
    parts = history.get("distill_losses") or []
    for name in parts[0] if parts else []:  # the loss's parts under distillation, on its scale
        left.plot(range(1, len(parts) + 1), [p[name] for p in parts], lw=0.6, ls="--", label=name)
    left.set(xlabel="step", ylabel="training loss (token CE)", title="loss")
    if parts:
        left.legend(fontsize=8)
    tasks = {task for entry in history["eval"] for task in entry["metrics"]}
    for task in sorted(tasks):
        points = [(e["step"], headline(task, e["metrics"][task])) for e in history["eval"] if task in e["metrics"]]
        right.plot([s for s, _ in points], [h[1] for _, h in points], marker="o", label=f"{task} ({points[0][1][0]})")
    right.set(xlabel="step", ylabel="metric", title="held-out metrics")
    if tasks:
        right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def show_real_photos(model_dir: Path, tasks: list[str], limit: int = 3) -> None:
    """Reload the exported model through `pipeline("ofa-ufo")` and print its answers on the
    bundled real photos (needs scikit-image, the `demo` extra) next to the hand-written labels."""
    try:
        examples = load_real_photos()
    except ImportError as error:
        print(f"real photos skipped ({error}); install with pip install 'ofa-ufo[demo]'")
        return
    pipe = pipeline("ofa-ufo", model=str(model_dir))
    classes = sorted({labels["class"] for labels in photo_labels().values()})  # the photos' class names
    photos = list(dict.fromkeys(e["meta"]["photo"] for e in examples))[:limit]
    for photo in photos:
        print(f"photo {photo}:")
        for task in tasks:
            example = next((e for e in examples if e["meta"]["photo"] == photo and e["task"] == task), None)
            if example is None:
                continue
            options = get_task(task).pipeline_call(example, classes)
            try:
                result = pipe(example["image"], task=task, **options)
            except ValueError as error:  # a task these photos cannot be asked about: say so, go on
                result = {"error": str(error)}
            truth = example.get("target") or example.get("box") or example.get("labels")
            question = f" {example['text']!r}" if example.get("text") else ""
            print(f"  {task:<15}{question}: {result} | labels: {truth}")
