"""Distillation into a small student and fast task extension, measured in one run on the demo tasks.

    .venv/bin/python benchmarks/distill_extend.py --out /tmp/distill_extend            # the fuller run
    .venv/bin/python benchmarks/distill_extend.py --out D --teacher checkpoints/ofa_ufo_tiny_ufo.pretrain_demo_chips
    (the teacher as trained by `python -m ofa_ufo.training --config pretrain_demo_chips max_steps=2400 ...`)
    .venv/bin/python benchmarks/distill_extend.py --out /tmp/distill_extend --quick    # a few steps (test)

1. Teacher: a tiny UFO supernet (`ofa_ufo_tiny_ufo`, 64 px) trained on the demo classification and VQA
   scenes (stem warmed up alone, then frozen, as pretrain_demo_chips), or `--teacher`, such a supernet
   trained before (pretrain_demo_chips), evaluated here on the same held-out scenes as the students.
2. Student: OFA-Tiny cut to d_model 64, 2 encoder + 1 decoder layers, over a ResNet-26 stem (stages 1-3, 2
   blocks each, against the teacher's ResNet-50; `--student-stem resnet14`: 1 block each; a request's time
   goes mostly to the decoder steps, so the student keeps one decoder layer), the stem warmed up alone on
   generated scenes as the teacher's was and frozen; trained the same steps on the same data without and with
   the teacher (token KL over the teacher's 16 likeliest tokens at T = 2, `--top-k 0 --temperature 1` for the
   whole vocabulary, + CWD on the encoder states, `--feature 0` without it, `--feature-layers image` on the
   image tokens entering the encoder instead, `encoder_image` on the encoder's output at the image positions
   only, `--feature-tasks T...` on those tasks' rows only; the table's footer has each loss part's mean over
   the first and the last tenth of the taught run). Latency, teacher (its extracted task
   subnet, what would ship) and student timed side by side in interleaved rounds on this CPU: one request
   (batch 1, greedy, 8 new tokens, the end token banned; before session 15 forced with `min_new_tokens`,
   whose vocabulary-wide processors added the same work to both and raised the ratio) and a forward of a
   batch of 4 (encoder + 4 decoder positions).
   `--five-tasks`: the students learn pretrain_demo_tiny's five-task mixture instead (pass a teacher trained
   on it) and are scored on each task. `--stem-from-teacher`: the student's stem learns the teacher's stem
   features (`distill_stem`) instead of the cell labels. `--student-config NAME`: the student is a shipped
   config's whole run instead (its preset, stem warm-up, mixture and steps; e.g. `pretrain_demo_tiny` under
   the base default `checkpoints/ofa_ufo_base.pretrain_demo` that `pretrain_ofa_base.sh` grew from it), run
   once as shipped and once with the teacher; `--student-alone DIR` takes a finished run of that config (the
   tiny default the base run trained first) as the first instead of training it again; `--student-override
   KEY=VALUE` replaces a field of both runs (e.g. a smaller decoder). `--token-kl W`: the token KL's weight
   (0: the CWD alone). `--table`: print a finished run's tables from its results.json.
3. Task extension: the teacher's shared path (`extract_subnet(model, "shared")`) fine-tuned on captioning,
   a task the supernet never trained, on 10 % of the demo scenes; against the whole supernet fine-tuned on
   100 % (the same steps).
Prints a table per part and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import ofa_ufo
from ofa_ufo.core.timing import device_name, interleaved_times
from ofa_ufo.deploy.profiles import request_inputs
from ofa_ufo.deploy.subnets import SHARED, extract_subnet
from ofa_ufo.generation.constraints import end_banned
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.training import train
from ofa_ufo.training.config import ConfigError, config_from_dict, parse_override, resolve_config_path
from ofa_ufo.training.mixture import build_batch, eval_examples
from ofa_ufo.training.report import evaluate_model, headline
from ofa_ufo.training.stem_warmup import distill_stem, warm_up_stem

STUDENT = dict(image_size=64, dropout=0.0, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256,
               vision_config={"resnet_type": "resnet26"})
STEM_SUBCELLS = 4  # as pretrain_demo_chips warms up the teacher's stem
TASKS = {"classification": 2.0, "vqa": 1.0}
# pretrain_demo_tiny's mixture (--five-tasks)
FIVE_TASKS = {"caption": 1.0, "vqa": 2.0, "grounding": 4.0, "detection": 2.0, "classification": 2.0}
STEM = "model.encoder.embed_images"
SCENES = 20000  # the demo's default pool; task extension trains on 10 % of it


def run(out: Path, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Train one config (fresh) and return its held-out metrics after training, its seconds and its directory."""
    config = config_from_dict({"output_dir": str(out / name), "num_threads": 1, "log_every": 50,
                               "precision": "fp32", **fields}, name)
    result = train(config, resume="never")
    print(f"{name}: {result.metrics_after} ({result.seconds:.0f} s)")
    entry = {"metrics": result.metrics_after, "seconds": round(result.seconds, 1), "path": str(result.output_dir)}
    parts = json.loads((result.output_dir / "metrics.json").read_text()).get("distill_losses")
    return dict(entry, loss_parts=loss_parts(parts)) if parts else entry


def loss_parts(parts: list[dict[str, float]]) -> dict[str, list[float]]:
    """Each distillation-run loss part's mean over the first and over the last tenth of the steps."""
    tenth = max(len(parts) // 10, 1)
    return {name: [round(statistics.fmean(p[name] for p in chunk), 4) for chunk in (parts[:tenth], parts[-tenth:])]
            for name in parts[0]}


def config_fields(name: str, eval_count: int, seed: int, threads: int) -> dict[str, Any]:
    """A shipped config's fields as one run of this benchmark trains them: its own recipe (its precision too,
    `auto` unless it names one), scored on the benchmark's held-out scenes, no intermediate evaluations or
    photos, the benchmark's seed and threads."""
    fields = yaml.safe_load(resolve_config_path(name).read_text())
    for key in ("description", "output_dir", "show_photos", "eval_every", "save_every"):
        fields.pop(key, None)
    return {"precision": "auto", **fields, "eval_examples": eval_count, "seed": seed, "num_threads": threads}


def latencies(teacher_dir: Path, student_dir: Path, rounds: int) -> dict[str, float]:
    """Median ms of the teacher (its extracted VQA subnet, what would ship) and the student, timed side by
    side in interleaved rounds: `{teacher,student}_request` (batch 1, greedy, 8 new tokens) and
    `{teacher,student}_forward` (batch 4 at 64 px, encoder + 4 decoder positions)."""
    processor = OFAUFOProcessor.from_pretrained(student_dir)
    teacher = OFAUFOForConditionalGeneration.from_pretrained(teacher_dir)
    if teacher.get_encoder().supernet is not None and teacher.get_encoder().supernet.routed:
        teacher = extract_subnet(teacher, "vqa")
    models = {"teacher": teacher.eval(), "student": OFAUFOForConditionalGeneration.from_pretrained(student_dir).eval()}
    request = request_inputs(processor, "vqa", STUDENT["image_size"])
    image = (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()
    batch = processor(images=[image] * 4, text=[" what is the shape in the image?"] * 4, return_tensors="pt")
    forward = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}
    forward["decoder_input_ids"] = torch.zeros(4, 4, dtype=torch.long)
    fns = {}
    for name, model in models.items():
        no_end = end_banned(model.generation_config.eos_token_id)  # 8 tokens, not min_new_tokens' extra passes
        fns[f"{name}_request"] = lambda m=model, p=no_end: m.generate(**request, max_new_tokens=8, num_beams=1,
                                                                       do_sample=False, logits_processor=p)
        fns[f"{name}_forward"] = lambda m=model: m(**forward)
    with torch.inference_mode():
        times = interleaved_times(fns, rounds, warmup=2)
    return {name: round(1e3 * statistics.median(values), 2) for name, values in times.items()}


def student_init(teacher_dir: Path, out: Path, warmup_images: int, stem_from_teacher: bool,
                 stem_labels: float = 0.0, stem: str = "resnet26") -> Path:
    """The student's start: a small OFA-Tiny whose own ResNet stem (`stem`) is warmed up alone on generated scenes,
    or with `stem_from_teacher` trained to reproduce the teacher's stem features on them (and with `stem_labels`
    > 0 to name the sub-cells' objects too, with that weight) (seeded, so both
    students start from the same weights; it stays frozen as the teacher's)."""
    processor = OFAUFOProcessor.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    student = ofa_ufo.create_model("ofa_ufo_tiny", **dict(STUDENT, vision_config={"resnet_type": stem}))
    if stem_from_teacher:
        teacher = OFAUFOForConditionalGeneration.from_pretrained(teacher_dir)
        fit = distill_stem(student, teacher, processor, warmup_images, label_weight=stem_labels, subcells=STEM_SUBCELLS)
        print(f"student stem distilled from the teacher's: held-out explained variance {fit['explained_variance']:.3f}")
    else:
        warm = warm_up_stem(student, processor, warmup_images, subcells=STEM_SUBCELLS)
        print(f"student stem warm-up: held-out cell accuracy {warm['object_cell_accuracy']:.3f} on objects")
    student.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def shared_path(teacher_dir: Path, out: Path) -> Path:
    """The teacher supernet's shared path as a model directory of its own."""
    shared = extract_subnet(OFAUFOForConditionalGeneration.from_pretrained(teacher_dir), SHARED)
    shared.save_pretrained(out)
    OFAUFOProcessor.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(warmup=48, student_warmup=48, teacher_steps=2, student_steps=2, extend_steps=2, eval_examples=4,
                    rounds=1)
    return dict(warmup=9600, student_warmup=9600, teacher_steps=2400, student_steps=1200, extend_steps=150,
                eval_examples=300, rounds=15)


def evaluate_saved(path: Path, fields: dict[str, Any], role: str = "teacher") -> dict[str, Any]:
    """Held-out metrics of a saved model on the examples a run of `fields` evaluates on."""
    config = config_from_dict(dict(fields, model=str(path)), "evaluation")
    model = OFAUFOForConditionalGeneration.from_pretrained(path).eval()
    processor = OFAUFOProcessor.from_pretrained(path)
    metrics = {}
    for task in config.tasks:
        examples, spec = eval_examples(config, task)
        metrics[task] = evaluate_model(model, processor, spec, examples, config.eval_batch_size).values
    print(f"{role} {path}: {metrics}")
    return {"metrics": metrics, "path": str(path)}


def teacher_softness(teacher_dir: Path, fields: dict[str, Any], count: int) -> dict[str, float]:
    """Mean share of the teacher's softened distribution at its held-out VQA target tokens that its 5 likeliest
    tokens hold, at T = 1 and T = 2: with a label-smoothed teacher over the ~59k-token vocabulary, softening
    hands most of the mass to the tail (why the token KL keeps T = 1 over the whole vocabulary)."""
    config = config_from_dict(dict(fields, model=str(teacher_dir)), "teacher softness")
    examples, _ = eval_examples(config, "vqa")
    model = OFAUFOForConditionalGeneration.from_pretrained(teacher_dir).eval()
    batch = build_batch(OFAUFOProcessor.from_pretrained(teacher_dir), examples[:count], model.config)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask", "task_ids", "labels")}
    with torch.no_grad():
        logits = model(**inputs).logits[batch["labels"] != -100].float()  # (target tokens, V)
    return {f"T={t}": round(float(torch.softmax(logits / t, -1).topk(5, -1).values.sum(-1).mean()), 3) for t in (1, 2)}


def distill_part(out: Path, s: dict[str, Any], teacher_dir: Path | None) -> tuple[dict[str, Any], Path]:
    if s["student_config"]:
        return config_students(out, s, teacher_dir), teacher_dir
    common = dict(tasks=s["tasks"], batch_size=12, lr=3e-4, warmup_ratio=0.05, eval_examples=s["eval_examples"],
                  freeze=[STEM], seed=s["seed"])
    if "grounding" in s["tasks"]:
        common["box_mask_weight"] = 4.0  # as pretrain_demo_tiny
    if teacher_dir is None:
        teacher_dir = out / "teacher"
        teacher = run(out, "teacher", dict(common, model="ofa_ufo_tiny_ufo", stem_warmup_images=s["warmup"],
                                           stem_warmup_subcells=4, model_overrides={"image_size": 64, "dropout": 0.0},
                                           lr_scale={"model.encoder.supernet": 0.3}, max_steps=s["teacher_steps"]))
    else:
        teacher = evaluate_saved(teacher_dir, common)
    teacher["top5_mass"] = teacher_softness(teacher_dir, common, s["eval_examples"])
    print(f"teacher's 5 likeliest tokens hold, of its softened distribution at the VQA targets: {teacher['top5_mass']}")
    start = student_init(teacher_dir, out / "student_init", s["student_warmup"], s["stem_from_teacher"],
                         s["stem_labels"], s["student_stem"])
    student = dict(common, model=str(start), max_steps=s["student_steps"], eval_every=s["eval_every"])
    alone = run(out, "student_alone", student)
    taught = run(out, "student_distilled", dict(student, distill=distill_fields(s, teacher_dir)))
    return timed(dict(teacher=teacher, student_alone=alone, student_distilled=taught, student_dir=str(start)),
                 teacher_dir, start, s["rounds"]), teacher_dir


def distill_fields(s: dict[str, Any], teacher_dir: Path) -> dict[str, Any]:
    """The run's `distill` field: token KL + CWD on the encoder states (or `--feature-layers`; on the rows of
    `--feature-tasks`), the benchmark's weights and settings."""
    return {"teacher": str(teacher_dir), "token_kl": s["token_kl"], "temperature": s["temperature"],
            "top_k": s["top_k"], "correct_only": s["correct_only"], "feature": s["feature"],
            "feature_layers": s.get("feature_layers", ["encoder"]), "feature_tasks": s.get("feature_tasks")}


def config_students(out: Path, s: dict[str, Any], teacher_dir: Path) -> dict[str, Any]:
    """`--student-config`: the shipped config's run without the teacher (or `--student-alone`, such a run
    finished before, scored here) and with it, all three models scored on the same held-out scenes."""
    fields = dict(config_fields(s["student_config"], s["eval_examples"], s["seed"], s["threads"]),
                  **dict(parse_override(text) for text in s["student_override"]))
    if s["quick"]:
        fields.update(max_steps=s["student_steps"], stem_warmup_images=s["student_warmup"])
    teacher = evaluate_saved(teacher_dir, fields)
    if s["student_alone"]:
        alone = evaluate_saved(Path(s["student_alone"]), fields, "student alone")
    else:
        alone = run(out, "student_alone", fields)
    taught = run(out, "student_distilled", dict(fields, distill=distill_fields(s, teacher_dir)))
    start = Path(alone["path"])
    return timed(dict(teacher=teacher, student_alone=alone, student_distilled=taught, student_dir=str(start)),
                 teacher_dir, start, s["rounds"])


def timed(part: dict[str, Any], teacher_dir: Path, student_dir: Path, rounds: int) -> dict[str, Any]:
    """`part` with the teacher's and the student's latencies and their ratios."""
    ms = latencies(teacher_dir, student_dir, rounds)
    return dict(part, latency_ms=ms, latency_ratio={kind: ms[f"student_{kind}"] / ms[f"teacher_{kind}"]
                                                    for kind in ("request", "forward")})


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
    d, tasks = results["distill"], results["settings"]["tasks"]
    ms = d["latency_ms"]
    print(f"\n## Distillation (measured on {results['device']})")
    print("| model | " + " | ".join(tasks) + " | request, batch 1 (ms) | forward, batch 4 (ms) |")
    print("|---|" + "---|" * (len(tasks) + 2))
    for name, key in (("teacher", "teacher"), ("student alone", "student_alone"),
                      ("student + teacher", "student_distilled")):
        side = "teacher" if key == "teacher" else "student"
        cells = " | ".join(_metric(d[key], t) for t in tasks)
        print(f"| {name} | {cells} | {ms[side + '_request']:.1f} | {ms[side + '_forward']:.1f} |")
    ratio = d["latency_ratio"]
    print(f"latency student / teacher: request {ratio['request']:.2f}, forward {ratio['forward']:.2f}")
    parts = d["student_distilled"].get("loss_parts")
    if parts:
        print("taught run's loss parts, mean of the first -> last tenth of its steps: "
              + ", ".join(f"{name} {a:.4f} -> {b:.4f}" for name, (a, b) in parts.items()))
    for task in tasks:
        kept = {key: _share(d[key], d["teacher"], task) for key in ("student_alone", "student_distilled")}
        print(f"{task}: the student keeps {kept['student_alone']} of the teacher's headline metric alone, "
              f"{kept['student_distilled']} taught")


def _share(entry: dict[str, Any], teacher: dict[str, Any], task: str) -> str:
    """The entry's headline metric of `task` (the trainer's table's: CIDEr, mAP@0.5, ...) as a percentage of
    the teacher's, rounded down to a tenth: a share just under a goal (0.6567 of 0.730) is not printed as
    meeting it (90 %)."""
    mine, theirs = ((headline(task, e["metrics"].get(task, {})) or (None, None))[1] for e in (entry, teacher))
    if mine is None or not theirs:
        return "-"
    return f"{math.floor(1000 * mine / theirs + 1e-9) / 10:.1f} %"


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
    parser.add_argument("--student-steps", type=int, help="the students' steps (default 1200, --quick 2)")
    parser.add_argument("--temperature", type=float, default=2.0, help="the token KL's temperature")
    parser.add_argument("--top-k", type=int, default=16, help="the token KL over the teacher's top k tokens (0: all)")
    parser.add_argument("--token-kl", type=float, default=1.0, help="the token KL's weight (0: none)")
    parser.add_argument("--feature", type=float, default=1.0, help="the CWD's weight on the encoder states (0: none)")
    parser.add_argument("--feature-layers", nargs="+", choices=("encoder", "encoder_image", "image"),
                        default=["encoder"],
                        help="the states the CWD compares: the encoder's output (every position, or the image "
                             "positions only), the image tokens entering it")
    parser.add_argument("--feature-tasks", nargs="+", metavar="TASK",
                        help="the CWD on these tasks' rows only (default: every task's)")
    parser.add_argument("--correct-only", action="store_true",
                        help="the token KL only where the teacher ranks the target first")
    parser.add_argument("--five-tasks", action="store_true",
                        help="the students learn pretrain_demo_tiny's five-task mixture, not classification + VQA")
    parser.add_argument("--stem-from-teacher", action="store_true",
                        help="the student's stem learns the teacher's stem features (distill_stem), not cell labels")
    parser.add_argument("--student-stem", choices=("resnet26", "resnet14"), default="resnet26",
                        help="the student's ResNet stem (resnet14: one bottleneck per stage instead of two)")
    parser.add_argument("--eval-every", type=int, default=0, help="the students' evaluations during training")
    parser.add_argument("--retime", action="store_true",
                        help="only time the teacher and the student of the run in --out again (e.g. alone, after a "
                        "run that shared the machine), rewrite its results.json and print its table")
    parser.add_argument("--table", action="store_true",
                        help="only print the tables of the finished run in --out (its results.json), as measured")
    parser.add_argument("--student-config", metavar="NAME",
                        help="the student is this shipped config's run (e.g. pretrain_demo_tiny; needs --teacher)")
    parser.add_argument("--student-alone", type=Path, metavar="DIR",
                        help="with --student-config: a finished run of it, the student without the teacher")
    parser.add_argument("--student-override", action="append", default=[], metavar="KEY=VALUE",
                        help="with --student-config: a field of the student's runs replaced, as the trainer's "
                        "overrides (e.g. 'model_overrides={image_size: 64, dropout: 0.0, decoder_layers: 2}')")
    parser.add_argument("--threads", type=int, default=1, help="with --student-config: the runs' threads")
    parser.add_argument("--stem-labels", type=float, default=0.0,
                        help="with --stem-from-teacher: weight of the cell labels' loss beside the features (0: none)")
    args = parser.parse_args()
    if args.student_config and not args.teacher:
        parser.error("--student-config needs --teacher (a trained model directory)")
    if args.student_config and not args.skip_extend:
        parser.error("--student-config measures the distillation only (task extension needs a supernet teacher): "
                     "add --skip-extend")
    if args.student_alone and not args.student_config:
        parser.error("--student-alone needs --student-config (the config that run was trained with)")
    if args.student_override and not args.student_config:
        parser.error("--student-override needs --student-config (the config whose fields it replaces)")
    for text in args.student_override:  # a malformed override fails here, not after the teacher's evaluation
        try:
            parse_override(text)
        except ConfigError as error:
            parser.error(f"--student-override: {error}")
    torch.set_num_threads(args.threads)
    if args.retime:
        return retime(args.out)
    if args.table:
        return print_tables(json.loads((args.out / "results.json").read_text()))
    s = dict(settings(args.quick), quick=args.quick, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
             correct_only=args.correct_only, token_kl=args.token_kl, feature=args.feature,
             feature_layers=args.feature_layers, feature_tasks=args.feature_tasks,
             stem_from_teacher=args.stem_from_teacher,
             stem_labels=args.stem_labels, tasks=FIVE_TASKS if args.five_tasks else TASKS,
             student_stem=args.student_stem, eval_every=args.eval_every,
             student_config=args.student_config, student_override=args.student_override, threads=args.threads,
             student_alone=str(args.student_alone) if args.student_alone else None)
    s["student_steps"] = args.student_steps or s["student_steps"]
    if args.student_config:
        s["tasks"] = config_fields(args.student_config, 0, 0, 1).get("tasks", s["tasks"])
    start = time.perf_counter()
    distilled, teacher_dir = distill_part(args.out, s, args.teacher)
    results = {"device": device_name(), "settings": s, "distill": distilled}
    if not args.skip_extend:
        results["extend"] = extend_part(args.out, s, teacher_dir)
    results["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print_tables(results)


def print_tables(results: dict[str, Any]) -> None:
    """The distillation table (and the task extension's, when the run has one) of a run's results."""
    print_distill(results)
    if "extend" in results:
        print_extend(results)


def retime(out: Path) -> None:
    """The latencies of a finished run measured again; its metrics are kept."""
    results = json.loads((out / "results.json").read_text())
    d = results["distill"]
    teacher = Path(d["teacher"].get("path", out / "teacher"))  # a teacher trained before session 15 has no path
    results["distill"] = timed(d, teacher, Path(d.get("student_dir", out / "student_init")),
                               results["settings"]["rounds"])
    results["device"] = device_name()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_distill(results)


if __name__ == "__main__":
    main()
