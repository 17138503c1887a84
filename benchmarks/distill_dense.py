"""DAMO-YOLO's neck distillation (CWD) of the small dense head from the medium one, measured in one run.

    .venv/bin/python benchmarks/distill_dense.py --out /tmp/distill_dense --steps 400 --teacher-steps 800
    .venv/bin/python benchmarks/distill_dense.py --out /tmp/d \
        --teacher checkpoints/ofa_ufo_tiny.distill_demo_dense_teacher
    .venv/bin/python benchmarks/distill_dense.py --out /tmp/distill_dense --quick    # a few steps (a test)

1. Teacher: `distill_demo_dense_teacher` (the medium dense head on dense detection alone, OFA-Tiny at 128 px
   over a ResNet-26 stem, demo scenes, LR 1e-3 as the student's), trained here for --teacher-steps, or
   `--teacher`, such a model trained before.
2. Student: `distill_demo_dense` (the small head), trained the same steps on the same scenes without the
   teacher and with it (CWD on the neck's three levels).
3. COCO mAP@0.5 (pycocotools) of the three on the same held-out scenes, the detectors' parameters, and the
   median seconds of the dense forward at batch 1 on this CPU.
Prints the table and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ofa_ufo.core.timing import device_name, median_time
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.training import load_config, train
from ofa_ufo.training.mixture import eval_examples
from ofa_ufo.training.report import evaluate_model

TEACHER, STUDENT = "distill_demo_dense_teacher", "distill_demo_dense"


def settings(quick: bool, steps: int) -> dict[str, Any]:
    """Overrides of both shipped configs: the step count; for a test also a short evaluation."""
    if quick:
        return dict(max_steps=2, demo_train_scenes=16, eval_examples=4)
    return dict(max_steps=steps)


def run(out: Path, name: str, config_name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Train one shipped config (fresh, `fields` overriding) and return its held-out metrics and seconds."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in
                 {"output_dir": str(out / name), "precision": "fp32", "save_every": 0, **fields}.items()]
    result = train(load_config(config_name, overrides), resume="never")
    print(f"{name}: {result.metrics_after} ({result.seconds:.0f} s)")
    return {"metrics": result.metrics_after["dense_detection"], "seconds": round(result.seconds, 1),
            "path": str(out / name)}


def evaluate_saved(path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Held-out metrics of a saved model on the scenes the students' runs evaluate on."""
    config = load_config(STUDENT, [f"{key}={json.dumps(value)}" for key, value in fields.items()])
    model = OFAUFOForConditionalGeneration.from_pretrained(path).eval()
    examples, spec = eval_examples(config, "dense_detection")
    scored = evaluate_model(model, OFAUFOProcessor.from_pretrained(path), spec, examples, config.eval_batch_size)
    print(f"teacher {path}: {scored.values}")
    return {"metrics": scored.values, "path": str(path)}


def detector_figures(path: Path, repeats: int) -> dict[str, Any]:
    """Parameters of the dense detector (stem to head) and its median batch-1 forward seconds at 128 px."""
    model = OFAUFOForConditionalGeneration.from_pretrained(path).eval()
    encoder = model.get_encoder()
    parts = [encoder.embed_images, model.dense_head] + ([encoder.supernet] if encoder.supernet is not None else [])
    pixels = torch.rand(1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        seconds = median_time(lambda: model.detect_dense(pixels), repeats=repeats)
    return {"params": sum(p.numel() for part in parts for p in part.parameters()),
            "neck_head_params": sum(p.numel() for p in model.dense_head.parameters()), "latency_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400, help="training steps of each student run")
    parser.add_argument("--teacher-steps", type=int, default=800, help="training steps of the teacher")
    parser.add_argument("--quick", action="store_true", help="a few steps of every run (a test)")
    parser.add_argument("--teacher", type=Path, help="a trained medium dense model (default: train it)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats of the latency figure")
    args = parser.parse_args()
    fields, start = settings(args.quick, args.steps), time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
        fields["num_threads"] = args.threads
    if args.teacher is None:
        teacher_fields = {**fields, "eval_every": 0, **({} if args.quick else {"max_steps": args.teacher_steps})}
        teacher = run(args.out, "teacher_medium", TEACHER, teacher_fields)
        teacher_dir = Path(teacher["path"])
    else:
        teacher_dir = args.teacher
        teacher = evaluate_saved(teacher_dir, fields)
    alone = run(args.out, "small_alone", STUDENT, {**fields, "distill": {}})
    distill = {**load_config(STUDENT).distill, "teacher": str(teacher_dir)}
    taught = run(args.out, "small_distilled", STUDENT, {**fields, "distill": distill})
    results = {"device": device_name(), "settings": fields, "teacher": teacher, "small_alone": alone,
               "small_distilled": taught}
    for entry in (teacher, alone, taught):
        entry.update(detector_figures(Path(entry["path"]), args.repeats))
    results["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n## CWD of the dense neck, small <- medium (measured on {results['device']})")
    print("| detector | params (M) | neck + head (M) | mAP@0.5 | mAP | batch-1 forward (ms) | train s |")
    print("|---|---|---|---|---|---|---|")
    for name, key in (("medium (teacher)", "teacher"), ("small alone", "small_alone"),
                      ("small + CWD from medium", "small_distilled")):
        e = results[key]
        print(f"| {name} | {e['params'] / 1e6:.2f} | {e['neck_head_params'] / 1e6:.2f} | {e['metrics']['map50']:.3f} "
              f"| {e['metrics']['map']:.3f} | {e['latency_s'] * 1000:.1f} | {e.get('seconds', '-')} |")
    gain = results["small_distilled"]["metrics"]["map50"] - results["small_alone"]["metrics"]["map50"]
    print(f"gain of distillation, mAP@0.5: {gain:+.3f}")


if __name__ == "__main__":
    main()
