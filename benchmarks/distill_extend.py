"""Distillation into a small student and fast task extension, measured in one run on the demo tasks.

    .venv/bin/python benchmarks/distill_extend.py --out /tmp/distill_extend            # the fuller run
    .venv/bin/python benchmarks/distill_extend.py --out /tmp/d --teacher checkpoints/ofa_ufo_tiny_ufo.pretrain_demo_chips
    .venv/bin/python benchmarks/distill_extend.py --out /tmp/distill_extend --quick    # a few steps (test)

1. Teacher: a tiny UFO supernet (`ofa_ufo_tiny_ufo`, 64 px) trained on the demo classification and VQA
   scenes (stem warmed up alone, then frozen, as pretrain_demo_chips), or `--teacher`, such a supernet
   trained before (pretrain_demo_chips), evaluated here on the same held-out scenes as the students.
2. Student: OFA-Tiny cut to d_model 64 and 2 + 2 layers, starting from the teacher's frozen stem; trained
   the same steps on the same data without and with the teacher (token KL + CWD on the encoder states).
   Latency: median forward (encoder + 4 decoder positions, batch 4) on this CPU, whole model and without
   the stem (the one part both share).
3. Task extension: the teacher's shared path (`extract_subnet(model, "shared")`) fine-tuned on captioning,
   a task the supernet never trained, on 10 % of the demo scenes; against the whole supernet fine-tuned on
   100 % (the same steps).
Prints a table per part and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import ofa_ufo
from ofa_ufo.core.timing import device_name, median_time
from ofa_ufo.deploy.subnets import SHARED, extract_subnet
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.training import train
from ofa_ufo.training.config import config_from_dict
from ofa_ufo.training.mixture import eval_examples
from ofa_ufo.training.report import evaluate_model

STUDENT = dict(image_size=64, dropout=0.0, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256)
TASKS = {"classification": 2.0, "vqa": 1.0}
STEM = "model.encoder.embed_images"
SCENES = 20000  # the demo's default pool; task extension trains on 10 % of it


def run(out: Path, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Train one config (fresh) and return its held-out metrics after training and its seconds."""
    config = config_from_dict({"output_dir": str(out / name), "num_threads": 1, "log_every": 50,
                               "precision": "fp32", **fields}, name)
    result = train(config, resume="never")
    print(f"{name}: {result.metrics_after} ({result.seconds:.0f} s)")
    return {"metrics": result.metrics_after, "seconds": round(result.seconds, 1)}


def latency(path: Path, repeats: int) -> tuple[float, float]:
    """(whole model, model without the stem) median forward seconds of a batch of 4 at 64 px."""
    model = OFAUFOForConditionalGeneration.from_pretrained(path).eval()
    processor = OFAUFOProcessor.from_pretrained(path)
    image = (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()
    batch = processor(images=[image] * 4, text=[" what is the shape in the image?"] * 4, return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}
    decoder = torch.zeros(4, 4, dtype=torch.long)
    task_ids = torch.zeros(4, dtype=torch.long)
    encoder = model.get_encoder()
    with torch.no_grad():
        whole = median_time(lambda: model(**inputs, task_ids=task_ids, decoder_input_ids=decoder), repeats=repeats)
        encoder.embed_images = _Fixed(encoder.embed_images(inputs["pixel_values"]))  # the stem's output, kept
        rest = median_time(lambda: model(**inputs, task_ids=task_ids, decoder_input_ids=decoder), repeats=repeats)
    return whole, rest


class _Fixed(torch.nn.Module):
    """Stands in for the stem with its output on the timed batch, so the rest of the model is timed alone."""

    def __init__(self, grid: torch.Tensor) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.grid


def student_init(teacher_dir: Path, out: Path) -> Path:
    """The student's start: a small OFA-Tiny holding the teacher's (warmed-up, frozen) stem."""
    teacher = OFAUFOForConditionalGeneration.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    student = ofa_ufo.create_model("ofa_ufo_tiny", **STUDENT)
    student.get_encoder().embed_images.load_state_dict(teacher.get_encoder().embed_images.state_dict())
    student.save_pretrained(out)
    OFAUFOProcessor.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def shared_path(teacher_dir: Path, out: Path) -> Path:
    """The teacher supernet's shared path as a model directory of its own."""
    shared = extract_subnet(OFAUFOForConditionalGeneration.from_pretrained(teacher_dir), SHARED)
    shared.save_pretrained(out)
    OFAUFOProcessor.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(warmup=48, teacher_steps=2, student_steps=2, extend_steps=2, eval_examples=4, repeats=1)
    return dict(warmup=4800, teacher_steps=300, student_steps=300, extend_steps=150, eval_examples=100, repeats=7)


def evaluate_saved(path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Held-out metrics of a saved model on the examples a run of `fields` evaluates on."""
    config = config_from_dict(dict(fields, model=str(path)), "evaluation")
    model = OFAUFOForConditionalGeneration.from_pretrained(path).eval()
    processor = OFAUFOProcessor.from_pretrained(path)
    metrics = {}
    for task in config.tasks:
        examples, spec = eval_examples(config, task)
        metrics[task] = evaluate_model(model, processor, spec, examples, config.eval_batch_size).values
    print(f"teacher {path}: {metrics}")
    return {"metrics": metrics, "path": str(path)}


def distill_part(out: Path, s: dict[str, Any], teacher_dir: Path | None) -> tuple[dict[str, Any], Path]:
    common = dict(tasks=TASKS, batch_size=12, lr=3e-4, warmup_ratio=0.05, eval_examples=s["eval_examples"],
                  freeze=[STEM], seed=s["seed"])
    if teacher_dir is None:
        teacher_dir = out / "teacher"
        teacher = run(out, "teacher", dict(common, model="ofa_ufo_tiny_ufo", stem_warmup_images=s["warmup"],
                                           stem_warmup_subcells=4, model_overrides={"image_size": 64, "dropout": 0.0},
                                           lr_scale={"model.encoder.supernet": 0.3}, max_steps=s["teacher_steps"]))
    else:
        teacher = evaluate_saved(teacher_dir, common)
    start = student_init(teacher_dir, out / "student_init")
    student = dict(common, model=str(start), max_steps=s["student_steps"])
    alone = run(out, "student_alone", student)
    distill = {"teacher": str(teacher_dir), "token_kl": 1.0, "temperature": 2.0, "feature": 1.0,
               "feature_layers": ["encoder"]}
    taught = run(out, "student_distilled", dict(student, distill=distill))
    t_whole, t_rest = latency(teacher_dir, s["repeats"])
    s_whole, s_rest = latency(start, s["repeats"])
    return {"teacher": teacher, "student_alone": alone, "student_distilled": taught,
            "latency_s": {"teacher": [t_whole, t_rest], "student": [s_whole, s_rest]},
            "latency_ratio": s_whole / t_whole, "latency_ratio_without_stem": s_rest / t_rest}, teacher_dir


def fixed_supernet(teacher_dir: Path, out: Path) -> Path:
    """The supernet with elastic sampling off, so that full fine-tuning trains the one (largest) arch."""
    model = OFAUFOForConditionalGeneration.from_pretrained(teacher_dir)
    model.config.vision_config.supernet_sample_arch = model.config.vision_config.supernet_sandwich = False
    model.save_pretrained(out)
    OFAUFOProcessor.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def extend_part(out: Path, s: dict[str, Any], teacher_dir: Path) -> dict[str, Any]:
    common = dict(tasks={"caption": 1.0}, batch_size=8, lr=3e-4, warmup_ratio=0.05, freeze=[STEM],
                  eval_examples=s["eval_examples"], max_steps=s["extend_steps"], seed=s["seed"])
    shared = shared_path(teacher_dir, out / "shared_path")
    few = run(out, "extend_shared_10pct", dict(common, model=str(shared), demo_train_scenes=SCENES // 10))
    whole = fixed_supernet(teacher_dir, out / "supernet")
    full = run(out, "extend_full_100pct", dict(common, model=str(whole), demo_train_scenes=SCENES))
    return {"shared_10pct": few, "full_100pct": full}


def print_distill(results: dict[str, Any]) -> None:
    d = results["distill"]
    print(f"\n## Distillation (measured on {results['device']}, shared machine)")
    print("| model | " + " | ".join(TASKS) + " | latency (batch 4) |")
    print("|---|" + "---|" * (len(TASKS) + 1))
    for name, key in (("teacher", "teacher"), ("student alone", "student_alone"),
                      ("student + teacher", "student_distilled")):
        lat = d["latency_s"]["teacher" if key == "teacher" else "student"][0]
        cells = " | ".join(_metric(d[key], t) for t in TASKS)
        print(f"| {name} | {cells} | {lat * 1000:.0f} ms |")
    print(f"latency ratio student/teacher: {d['latency_ratio']:.2f} (without the shared stem: "
          f"{d['latency_ratio_without_stem']:.2f})")


def print_extend(results: dict[str, Any]) -> None:
    e = results["extend"]
    print("\n## Task extension (caption, never trained by the supernet)")
    print("| run | data | caption metrics |\n|---|---|---|")
    print(f"| shared path | 10 % | {_metric(e['shared_10pct'], 'caption')} |")
    print(f"| whole supernet | 100 % | {_metric(e['full_100pct'], 'caption')} |")


def _metric(entry: dict[str, Any], task: str) -> str:
    """The task's held-out metrics as `name value` pairs."""
    return ", ".join(f"{name} {value:.3f}" for name, value in entry["metrics"].get(task, {}).items()) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a few steps of every run (a test)")
    parser.add_argument("--skip-extend", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="the runs' data order (the student's start is fixed)")
    parser.add_argument("--teacher", type=Path, help="a trained supernet directory (default: train one here)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    s, start = dict(settings(args.quick), seed=args.seed), time.perf_counter()
    distilled, teacher_dir = distill_part(args.out, s, args.teacher)
    results = {"device": device_name(), "settings": s, "distill": distilled}
    if not args.skip_extend:
        results["extend"] = extend_part(args.out, s, teacher_dir)
    results["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print_distill(results)
    if "extend" in results:
        print_extend(results)


if __name__ == "__main__":
    main()
