"""Evaluate a model directory on a task spec: predictions through `pipeline("ofa-ufo")`, the
spec's metric, a printed table and the predictions written as JSON.

    python -m ofa_ufo.evaluate --spec demo_vqa --model checkpoints/ofa_ufo_base.pretrain_demo
    COCO_ROOT=/data/coco python -m ofa_ufo.evaluate --spec coco_caption --model DIR --limit 500

The spec's data are opened by `ofa_ufo.data.sources`; their locations may use environment variables
(`${COCO_ROOT}`), and an unset one is an error naming it.

An example that cannot be answered (an unreadable or missing image) is not scored: the table says how many
examples were scored and how many failed, with the first errors, and the predictions JSON keeps every error
record. When every example fails, or more than `--max-failures` of them (default 0.05), the command prints
the table and exits 1: a metric over a data problem is no result of the model.
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

from ofa_ufo.core.images import blind_examples
from ofa_ufo.data.sources import decoding_options, open_examples
from ofa_ufo.data.specs import TaskSpec, load_spec
from ofa_ufo.hf.saved_files import check_saved_model
from ofa_ufo.tasks import get_task
from ofa_ufo.tasks.scored_results import DEFAULT_MAX_FAILURES, ScoredResults, check_share, score_results


def evaluate(spec: TaskSpec, model: str, limit: int | None = None, output: str | None = None,
             blind: bool = False) -> ScoredResults:
    """Run the spec's task on its evaluation data and score it: the metric over the examples that got an
    answer, with the ones that failed counted (their error records stay in the predictions JSON). `blind`:
    every image replaced by a constant grey one, the score the prompt alone earns (a baseline)."""
    check_saved_model(model)  # a spoilt file is named here, not deep inside the pipeline's model loader
    task = get_task(spec.task)
    examples = list(islice(open_examples(spec.data, spec.task), limit))
    if not examples:
        raise ValueError(f"spec {spec.name!r}: no evaluation examples")
    if blind:
        examples = blind_examples(examples)
    labels = spec.data.get("labels") or sorted({e["target"] for e in examples if e.get("target")})
    generation = {**spec.generation, **decoding_options(spec.data)}  # e.g. VQA's answer trie (data.answers)
    pipe = pipeline("ofa-ufo", model=model)
    predictions, results = [], []
    for example in tqdm(examples, desc=f"evaluate {spec.name}", unit="example"):
        result = pipe(example["image"], task=spec.task, style=spec.prompt_style, on_error="record",  # counted, not scored
                      **generation, **task.pipeline_call(example, labels))
        predictions.append({"id": example["id"], **result})
        results.append(result)
    scored = score_results(task, spec.metric, examples, results)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({"spec": spec.name, "scores": scored.values, "scored": scored.scored,
                                            "failed": scored.failed, "predictions": predictions}, indent=1))
    return scored


def format_table(spec: TaskSpec, scored: ScoredResults) -> str:
    """The metric over the scored examples, the scored and failed counts, then the first errors."""
    rows = [f"| {spec.name} ({scored.total} examples) | value |", "|---|---|"]
    rows += [f"| {name} | {value:.4f} |" for name, value in scored.values.items()] or [f"| {spec.metric} | - |"]
    rows += [f"| scored | {scored.scored} |", f"| failed | {scored.failed} |"]
    if scored.failed:
        shown = f" (the first {len(scored.errors)} below)" if scored.failed > len(scored.errors) else ""
        rows += ["", f"{scored.failed} of {scored.total} examples failed and are not in the metric{shown}:",
                 *(f"  {line}" for line in scored.error_lines())]
    return "\n".join(rows)


def _share(text: str) -> float:
    """argparse type of --max-failures: a share in [0, 1]."""
    try:
        return check_share(float(text), "--max-failures")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="a spec name from tasks/ or a path to a spec file")
    parser.add_argument("--model", required=True, help="a save_pretrained model directory")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--output", help="predictions JSON (default: <model>/eval_<spec>.json)")
    parser.add_argument("--max-failures", type=_share, default=DEFAULT_MAX_FAILURES, metavar="SHARE",
                        help="the share of examples that may fail (e.g. an unreadable image) before the command "
                             f"exits 1 (default {DEFAULT_MAX_FAILURES}); every example failing always exits 1")
    parser.add_argument("--blind", action="store_true",
                        help="replace every image by a constant grey one: what the prompt alone earns (a baseline)")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    suffix = "_blind" if args.blind else ""
    output = args.output or str(Path(args.model) / f"eval_{spec.name}{suffix}.json")
    try:
        scored = evaluate(spec, args.model, args.limit, output, args.blind)
    except (ValueError, OSError) as error:  # OSError: a file of the model directory (SavedFileError) or data
        print(f"evaluate: {error}", file=sys.stderr)
        return 1
    print(format_table(spec, scored))
    print(f"predictions written to {output}")
    problem = scored.problem(args.max_failures)
    if problem:
        allow = f" (--max-failures {args.max_failures}): the metric is no result of the model" if scored.scored else ""
        more = " or allow more with --max-failures" if scored.scored else ""
        print(f"evaluate: {problem}{allow}; fix the data (every error is in {output}){more}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
