"""Held-out demo scores of trained models, with the blind baseline: the figures the README quotes.

    .venv/bin/python benchmarks/demo_heldout.py checkpoints/ofa_ufo_base.pretrain_demo \
        checkpoints/ofa_ufo_tiny.pretrain_demo --scenes 500

For each model directory and each demo task (caption, VQA, grounding, detection, classification) it
scores the first `--scenes` held-out scenes (the trainer's `eval_examples` draw: its 100 are the
first 100 of these) twice: as they are, and with every image replaced by a constant grey one (the
blind baseline: what the prompt alone earns). Prints one table per model with the margin over the
blind score, and the encoder image signal on the first 32 held-out examples; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ofa_ufo.core.images import blind_examples
from ofa_ufo.core.timing import cpu_name
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.training.config import TrainConfig
from ofa_ufo.training.mixture import eval_examples
from ofa_ufo.training.report import encoder_image_signal, evaluate_model, headline
from ofa_ufo.training.step_batches import loadable

TASKS = ("caption", "vqa", "grounding", "detection", "classification")


def score_model(path: Path, scenes: int, tasks: tuple[str, ...], batch_size: int) -> dict:
    """{task: {metric, value, blind}} and the image signal of one saved model."""
    model = OFAUFOForConditionalGeneration.from_pretrained(path).eval()
    processor = OFAUFOProcessor.from_pretrained(path)
    config = TrainConfig(tasks={task: 1.0 for task in tasks}, eval_examples=scenes)
    rows, signal = {}, None
    for task in tasks:
        examples, spec = eval_examples(config, task)
        seen = evaluate_model(model, processor, spec, examples, batch_size)
        blind = evaluate_model(model, processor, spec, blind_examples(examples), batch_size)
        name, value = headline(task, seen.values)
        rows[task] = {"metric": name, "value": value, "blind": blind.values[name], "scored": seen.scored,
                      "failed": seen.failed}
        if signal is None:
            signal = encoder_image_signal(model, processor, loadable(examples[:32]))
    return {"tasks": rows, "image_signal": signal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="save_pretrained directories")
    parser.add_argument("--scenes", type=int, default=500, help="held-out scenes per task (default 500)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; {args.scenes} held-out scenes per task")
    results = {}
    for path in args.models:
        start = time.perf_counter()
        result = score_model(path, args.scenes, tuple(args.tasks), args.batch_size)
        result["seconds"] = time.perf_counter() - start
        results[str(path)] = result
        print(f"\n{path} ({result['seconds']:.0f} s; encoder image signal {result['image_signal']:.3f})")
        print("| task | metric | score | blind (constant image) | margin | scored |")
        print("|---|---|---|---|---|---|")
        for task, row in result["tasks"].items():
            print(f"| {task} | {row['metric']} | {row['value']:.3f} | {row['blind']:.3f} | "
                  f"{row['value'] - row['blind']:+.3f} | {row['scored']} ({row['failed']} failed) |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu_name(), "scenes": args.scenes, "models": results}, indent=1))


if __name__ == "__main__":
    main()
