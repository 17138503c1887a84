"""A CNN student for the embedding tasks, distilled from the AllInOne demo model, measured in one run.

    .venv/bin/python benchmarks/distill_cnn.py --out /tmp/distill_cnn            # teacher + two students
    .venv/bin/python benchmarks/distill_cnn.py --out /tmp/d --teacher checkpoints/ofa_ufo_tiny.pretrain_demo_allinone
    .venv/bin/python benchmarks/distill_cnn.py --out /tmp/distill_cnn --quick    # a few steps (a test)

1. Teacher: `pretrain_demo_allinone` (OFA-Tiny, 64 px, face / person and vehicle ReID / product on generated
   identities), trained here, or `--teacher`, such a model trained before (evaluated here on the same
   held-out identities as the students).
2. Student: `distill_demo_cnn` (a ResNet-26 stem read out as its mean projected image token), trained the
   same steps on the same identities without the teacher and with it (embedding distillation).
3. Retrieval metrics of the three on the held-out identities (mAP and rank-1 for ReID, verification
   accuracy for face, Recall@1 for product), parameters, and the median seconds of `embed` at batch 1
   and 32 on this CPU (warm-up excluded).
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

TEACHER, STUDENT = "pretrain_demo_allinone", "distill_demo_cnn"
BATCHES = (1, 32)
SHOWN = {"face": ("accuracy",), "reid_person": ("mAP", "rank1"), "reid_vehicle": ("mAP", "rank1"),
         "product": ("recall@1",)}  # the table's metrics per task (results.json keeps them all)


def settings(quick: bool) -> dict[str, Any]:
    """Overrides of both shipped configs: none for the measured run; a few steps and examples for a test."""
    if quick:
        return dict(stem_warmup_images=40, max_steps=2, batch_size=20, demo_train_identities=8, eval_examples=8,
                    eval_batch_size=8)
    return {}


def run(out: Path, name: str, config_name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Train one shipped config (fresh, `fields` overriding) and return its held-out metrics and seconds."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in
                 {"output_dir": str(out / name), "precision": "fp32", **fields}.items()]
    result = train(load_config(config_name, overrides), resume="never")
    print(f"{name}: {result.metrics_after} ({result.seconds:.0f} s)")
    return {"metrics": result.metrics_after, "seconds": round(result.seconds, 1), "path": str(out / name)}


def evaluate_saved(path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Held-out metrics of a saved model on the identities the student's runs evaluate on."""
    config = load_config(STUDENT, [f"{key}={json.dumps(value)}" for key, value in fields.items()])
    model = OFAUFOForConditionalGeneration.from_pretrained(path).eval()
    processor = OFAUFOProcessor.from_pretrained(path)
    metrics = {}
    for task in config.tasks:
        examples, spec = eval_examples(config, task)
        metrics[task] = evaluate_model(model, processor, spec, examples, config.eval_batch_size).values
    print(f"teacher {path}: {metrics}")
    return {"metrics": metrics, "path": str(path)}


def embed_latency(path: Path, batch: int, repeats: int) -> float:
    """Median seconds of `embed` (a ReID prompt, 64 px images) for a batch of `batch`."""
    model = OFAUFOForConditionalGeneration.from_pretrained(path).eval()
    processor = OFAUFOProcessor.from_pretrained(path)
    images = [(torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy() for _ in range(batch)]
    inputs = processor(images=images, text=[" what is the person's identity?"] * batch, return_tensors="pt")
    task_ids = torch.full((batch,), model.config.vision_config.route_id("reid_person"), dtype=torch.long)
    with torch.no_grad():
        return median_time(lambda: model.embed(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                                               task_ids=task_ids), repeats=repeats)


def parameters(path: Path) -> tuple[int, int]:
    """(all parameters, those of the ResNet stem)."""
    model = OFAUFOForConditionalGeneration.from_pretrained(path)
    stem = model.get_encoder().embed_images
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in stem.parameters())


def print_table(results: dict[str, Any]) -> None:
    rows = (("teacher (pretrain_demo_allinone)", "teacher"), ("CNN student alone", "student_alone"),
            ("CNN student + teacher", "student_distilled"))
    tasks = list(results["teacher"]["metrics"])
    print(f"\n## CNN student (measured on {results['device']})")
    print("| model | params (stem) | " + " | ".join(tasks) + " | embed ms (batch 1 / 32) |")
    print("|---|---|" + "---|" * (len(tasks) + 1))
    for name, key in rows:
        entry = results[key]
        cells = " | ".join(", ".join(f"{m} {entry['metrics'][t][m]:.3f}" for m in SHOWN[t]) for t in tasks)
        lat = " / ".join(f"{s * 1000:.1f}" for s in entry["latency_s"])
        total, stem = entry["params"]
        print(f"| {name} | {total / 1e6:.2f}M ({stem / 1e6:.2f}M) | {cells} | {lat} |")
    ratios = [s / t for s, t in zip(results["student_distilled"]["latency_s"], results["teacher"]["latency_s"])]
    print("embed latency student/teacher: " + ", ".join(f"batch {b}: {r:.2f}" for b, r in zip(BATCHES, ratios)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a few steps of every run (a test)")
    parser.add_argument("--teacher", type=Path, help="a trained pretrain_demo_allinone directory (default: train it)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per latency figure")
    args = parser.parse_args()
    fields, start = settings(args.quick), time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
        fields["num_threads"] = args.threads
    if args.teacher is None:
        teacher = run(args.out, "teacher", TEACHER, fields)
        teacher_dir = Path(teacher["path"])
    else:
        teacher_dir = args.teacher
        teacher = evaluate_saved(teacher_dir, fields)
    alone = run(args.out, "student_alone", STUDENT, {**fields, "distill": {}})
    distill = {**load_config(STUDENT).distill, "teacher": str(teacher_dir)}
    taught = run(args.out, "student_distilled", STUDENT, {**fields, "distill": distill})
    results = {"device": device_name(), "threads": torch.get_num_threads(), "settings": fields,
               "teacher": teacher, "student_alone": alone, "student_distilled": taught}
    for entry in (teacher, alone, taught):
        path = Path(entry["path"])
        entry["params"] = parameters(path)
        entry["latency_s"] = [embed_latency(path, batch, args.repeats) for batch in BATCHES]
    results["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
