"""Evaluate a model directory on a task spec: predictions through `pipeline("ofa-ufo")`, the
spec's metric, a printed table and the predictions written as JSON.

    python -m ofa_ufo.evaluate --spec demo_vqa --model checkpoints/ofa_ufo_base.pretrain_demo
    COCO_ROOT=/data/coco python -m ofa_ufo.evaluate --spec coco_caption --model DIR --limit 500

The spec's data are opened by `ofa_ufo.data.sources`; their locations may use environment variables
(`${COCO_ROOT}`), and an unset one is an error naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm
from transformers import pipeline

from ofa_ufo.data.sources import open_examples
from ofa_ufo.data.specs import TaskSpec, load_spec
from ofa_ufo.metrics import get_metric
from ofa_ufo.tasks import get_task


def evaluate(spec: TaskSpec, model: str, limit: int | None = None, output: str | None = None) -> dict[str, float]:
    """Run the spec's task on its evaluation data and score it; returns the metric values."""
    task = get_task(spec.task)
    examples = list(islice(open_examples(spec.data, spec.task), limit))
    if not examples:
        raise ValueError(f"spec {spec.name!r}: no evaluation examples")
    labels = spec.data.get("labels") or sorted({e["target"] for e in examples if e.get("target")})
    pipe = pipeline("ofa-ufo", model=model)
    predictions, pairs = [], []
    for example in tqdm(examples, desc=f"evaluate {spec.name}", unit="example"):
        result = pipe(example["image"], task=spec.task, style=spec.prompt_style, on_error="record",  # scored as wrong
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
