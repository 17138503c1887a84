"""Evaluate a model directory on a task spec: predictions through `pipeline("ofa-ufo")`, the
spec's metric, a printed table and the predictions written as JSON.

    python -m ofa_ufo.evaluate --spec demo_vqa --model checkpoints/ofa_ufo_base.pretrain_demo
    COCO_ROOT=/data/coco python -m ofa_ufo.evaluate --spec coco_caption --model DIR --limit 500

Data locations in specs may use environment variables (`${COCO_ROOT}`); an unset one is an
error naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ofa_ufo.data import DemoScenes, make_examples
from ofa_ufo.data.demo_scenes import DEFAULT_OBJECT_SIZE
from ofa_ufo.data.convert import FORMATS
from ofa_ufo.data.loaders import LoadReport
from ofa_ufo.metrics import get_metric
from ofa_ufo.data.specs import TaskSpec, load_spec
from ofa_ufo.tasks import get_task

_DEMO_DEFAULTS = {"val_scenes": 200, "size": 256, "seed": 0}
_DEMO_IDENTITY_DEFAULTS = {"train_identities": 1000, "views": 8, "val_examples": 200, "size": 128, "seed": 0}
_CONVERT_OPTIONS = ("input", "images", "annotations", "layout", "selected_cols", "split", "image_pattern",
                    "task", "columns", "id_column", "on_error")


def expand_env(value: Any) -> Any:
    """Substitute environment variables in a spec path; an unset one is named in the error."""
    if not isinstance(value, str):
        return value
    expanded = os.path.expandvars(value)
    unset = re.findall(r"\$\{?(\w+)\}?", expanded)
    if unset:
        raise ValueError(f"set the environment variable(s) {unset} used by the data path {value!r}")
    return expanded


def open_examples(spec: TaskSpec, split: str = "val") -> Iterator[dict[str, Any]]:
    """Canonical examples of a spec's evaluation data (generated demo scenes or a dataset format)."""
    data = spec.data
    if data.get("source") == "demo_identities":
        yield from _demo_identities(spec, split)
        return
    if data.get("source") == "demo_scenes":
        settings = {**_DEMO_DEFAULTS, **data}
        scenes = DemoScenes(split, settings["val_scenes"], size=settings["size"], seed=settings["seed"],
                            max_objects=settings.get("max_objects", 3),
                            object_size=tuple(settings.get("object_size", DEFAULT_OBJECT_SIZE)))
        for index in range(len(scenes)):
            (example,) = make_examples(scenes[index], scenes.example_rng(index), (spec.task,))
            yield {**example, "id": f"{split}-{index}"}
        return
    if data.get("format") not in FORMATS:
        raise ValueError(f"spec {spec.name!r}: data.format must be one of {sorted(FORMATS)} or source: demo_scenes")
    if split == "train":
        if not isinstance(data.get("train"), dict):
            raise ValueError(f"spec {spec.name!r} names no training data: add data.train with the training split's "
                             f"locations (the keys of data: {sorted(_CONVERT_OPTIONS)})")
        data = {**data, **data["train"]}
    options = {key: expand_env(data.get(key)) for key in _CONVERT_OPTIONS}
    options["on_error"] = options["on_error"] or "skip"
    yield from FORMATS[data["format"]](argparse.Namespace(**options), LoadReport())


def _demo_identities(spec: TaskSpec, split: str) -> Iterator[dict[str, Any]]:
    """Generated identities (`ofa_ufo.data.demo_identities`): the training images, or held-out identities
    laid out for the task's metric (query/gallery, face pairs, product groups)."""
    from ofa_ufo.data.demo_identities import DemoIdentities, held_out_examples

    settings = {**_DEMO_IDENTITY_DEFAULTS, **spec.data}
    if split == "train":
        yield from DemoIdentities(spec.task, "train", settings["train_identities"], settings["views"],
                                  settings["size"], settings["seed"])
        return
    yield from held_out_examples(spec.task, settings["val_examples"], settings["size"], settings["seed"])


def evaluate(spec: TaskSpec, model: str, limit: int | None = None, output: str | None = None) -> dict[str, float]:
    """Run the spec's task on its evaluation data and score it; returns the metric values."""
    from transformers import pipeline

    task = get_task(spec.task)
    examples = list(islice(open_examples(spec), limit))
    if not examples:
        raise ValueError(f"spec {spec.name!r}: no evaluation examples")
    labels = spec.data.get("labels") or sorted({e["target"] for e in examples if e.get("target")})
    pipe = pipeline("ofa-ufo", model=model)
    predictions, pairs = [], []
    for example in tqdm(examples, desc=f"evaluate {spec.name}", unit="example"):
        result = pipe(example["image"], task=spec.task, style=spec.prompt_style,
                      **spec.generation, **task.pipeline_call(example, labels))
        predictions.append({"id": example["id"], **result})
        pairs.append(task.metric_pair(result, example))
    scores = get_metric(spec.metric)([p for p, _ in pairs], [r for _, r in pairs])
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({"spec": spec.name, "scores": scores, "predictions": predictions}, indent=1))
    return scores


def format_table(spec: TaskSpec, scores: dict[str, float], count: int) -> str:
    rows = [f"| {spec.name} ({count} examples) | value |", "|---|---|"]
    rows += [f"| {name} | {value:.4f} |" for name, value in scores.items()]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="a spec name from tasks/ or a path to a spec file")
    parser.add_argument("--model", required=True, help="a save_pretrained model directory")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--output", help="predictions JSON (default: <model>/eval_<spec>.json)")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    output = args.output or str(Path(args.model) / f"eval_{spec.name}.json")
    try:
        scores = evaluate(spec, args.model, args.limit, output)
    except (ValueError, FileNotFoundError) as error:
        print(f"evaluate: {error}", file=sys.stderr)
        return 1
    count = len(json.loads(Path(output).read_text())["predictions"])
    print(format_table(spec, scores, count))
    print(f"predictions written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
