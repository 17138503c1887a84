"""Dense (DAMO-YOLO head) vs generative detection vs transformers' D-FINE on the demo scenes, for the same
training wall time each (issue 32, item 5).

    .venv/bin/python benchmarks/dense_detection.py --seconds 240     # the table in benchmarks/README.md
    .venv/bin/python benchmarks/dense_detection.py --quick           # tiny budgets, under 2 minutes
    .venv/bin/python benchmarks/dense_detection.py --dense-only 3 --seconds 180 --dense-lr 3e-4   # a recipe probe

Three models train on the same generated scenes (`ofa_ufo_tiny` at 128 px over a ResNet-26 stem (`--resnet`),
batch 8, fp32, constant LR after a short warm-up, `--seconds` of wall time each, data generation included):
(a) the `detection` task (boxes as decoder tokens, LR 3e-4 as the demo configs) and (b) the
`dense_detection` task (the `small` DAMO-YOLO head, `--dense-preset`, at LR 1e-3, `--dense-lr`) through the
project's `Trainer`, and (c) the peer, transformers' `DFineForObjectDetection` (random init, an HGNetV2-B0
backbone as D-FINE-S, 100 queries, its own loss and AdamW recipe) on the same stream of scenes. All three are
scored on the same held-out scenes with COCO mAP@0.5 (pycocotools, `ofa_ufo.metrics.coco_map`).
Images/s is end-to-end (pre-processing, model, post-processing) over `--images` images at batch 1 and 8.
Then the extracted detector's latency fused vs unfused (PyTorch and ONNX Runtime, `measure_detector_latency`)
and the three presets' parameters and latency. The first line names the CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DFineConfig, DFineForObjectDetection, HGNetV2Config, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ofa_ufo  # noqa: E402
from ofa_ufo.core.hardware import precision_support  # noqa: E402
from ofa_ufo.core.images import load_image  # noqa: E402
from ofa_ufo.core.timing import device_name, time_call  # noqa: E402
from ofa_ufo.deploy.dense_detector import measure_detector_latency  # noqa: E402
from ofa_ufo.hf.pipeline import OFAUFOPipeline  # noqa: E402
from ofa_ufo.layers.rep_conv import fuse_reparam  # noqa: E402
from ofa_ufo.metrics import coco_map  # noqa: E402
from ofa_ufo.models.damo_yolo import DENSE_PRESETS, image_pyramid  # noqa: E402
from ofa_ufo.training import Trainer  # noqa: E402
from ofa_ufo.training.config import config_from_dict  # noqa: E402
from ofa_ufo.training.mixture import Mixture, build_sources, eval_examples, task_quotas  # noqa: E402
from ofa_ufo.training.report import evaluate_model  # noqa: E402

IMAGE_SIZE = 128
BATCH = 8
LR = 3e-4  # the generative detector's, as in the demo configs
DENSE_LR = 1e-3  # the dense head's: at 3e-4 it reached mAP@0.5 0.337 in 180 s against 0.443 at 1e-3 (LOG.md)
DFINE_LR = 2e-4  # D-FINE-S's AdamW recipe (lr 2e-4, weight decay 1e-4, clip 0.1)


@dataclass
class Run:
    """One trained detector: its name, parameter count, steps in the budget, mAP@0.5, and a predict
    function (list of PIL images, batch size) -> per-image {"boxes", "labels", "scores"}."""

    name: str
    params: int
    steps: int
    map50: float
    predict: Callable[[list, int], list[dict]]


@dataclass
class Recipe:
    """What the OFA-UFO runs are built from: the ResNet stem, the dense head's preset and its LR."""

    resnet: str = "resnet26"
    dense_preset: str = "small"
    dense_lr: float = DENSE_LR

    def model_overrides(self) -> dict:
        return {"image_size": IMAGE_SIZE, "dropout": 0.0, "vision_config": {"resnet_type": self.resnet}}


def train_config(task: str, output_dir: str, eval_count: int, recipe: Recipe):
    """The project's training config of one OFA-UFO run (constant LR after ~20 warm-up steps)."""
    lr = recipe.dense_lr if task == "dense_detection" else LR
    fields = dict(model="ofa_ufo_tiny", model_overrides=recipe.model_overrides(),
                  tasks={task: 1.0}, batch_size=BATCH, max_steps=100_000, lr=lr, end_lr=lr, warmup_ratio=2e-4,
                  clip_norm=5.0, label_smoothing=0.1, precision="fp32", num_threads=torch.get_num_threads(),
                  eval_examples=eval_count, log_every=10_000, output_dir=output_dir)
    if task == "dense_detection":
        fields["dense_head"] = recipe.dense_preset
    return config_from_dict(fields, f"bench_{task}")


def train_for(step: Callable[[], None], seconds: float) -> int:
    """Call `step` until `seconds` of wall time are spent (the last call may overrun); returns the calls."""
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps


def trainer_step(trainer: Trainer) -> Callable[[], None]:
    """One optimiser step of `trainer` per call, the model put in training mode first."""
    trainer._train_mode()

    def step() -> None:
        trainer.train_step()
        trainer.step += 1
    return step


def ofa_run(task: str, seconds: float, eval_count: int, workdir: str, recipe: Recipe) -> tuple[Run, object, object]:
    """Train `task` with the project's Trainer for `seconds`, score it on the held-out scenes."""
    config = train_config(task, f"{workdir}/{task}", eval_count, recipe)
    trainer = Trainer(config, resume="never")
    steps = train_for(trainer_step(trainer), seconds)
    model, processor = trainer.unwrapped.eval(), trainer.processor
    examples, spec = eval_examples(config, task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        map50 = evaluate_model(model, processor, spec, examples, batch_size=BATCH).values["map50"]
    pipe = OFAUFOPipeline(model=model, processor=processor, tokenizer=processor.tokenizer,
                          image_processor=processor.image_processor)
    predict = lambda images, batch: pipe(images, task=task, batch_size=batch)  # noqa: E731
    params = sum(p.numel() for p in model.parameters())
    return Run(task, params, steps, map50, predict), model, processor


def dfine_model(num_labels: int) -> DFineForObjectDetection:
    """D-FINE-S's shape (HGNetV2-B0 backbone, hidden expansion 0.5, depth 0.34, 3 decoder layers), 100 queries."""
    backbone = HGNetV2Config(
        stem_channels=[3, 16, 16], stage_in_channels=[16, 64, 256, 512], stage_mid_channels=[16, 32, 64, 128],
        stage_out_channels=[64, 256, 512, 1024], stage_num_blocks=[1, 1, 2, 1], stage_numb_of_layers=[3, 3, 3, 3],
        stage_kernel_size=[3, 3, 5, 5], stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True], hidden_sizes=[64, 256, 512, 1024], use_lab=True,
        out_features=["stage2", "stage3", "stage4"])
    config = DFineConfig(backbone_config=backbone, encoder_in_channels=[256, 512, 1024], hidden_expansion=0.5,
                         depth_mult=0.34, decoder_layers=3, decoder_n_points=[3, 6, 3], num_labels=num_labels,
                         num_queries=100, freeze_backbone_batch_norms=False)
    torch.manual_seed(0)
    return DFineForObjectDetection(config)


def dfine_pixels(processor, images) -> torch.Tensor:
    """The same square resize as the OFA-UFO runs, scaled to [0, 1] as D-FINE's processor gives it."""
    return (processor.image_processor(images, return_tensors="pt")["pixel_values"] + 1) / 2  # (B, 3, S, S)


def dfine_targets(examples, images, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """DETR-style labels: class ids and boxes as normalised (cx, cy, w, h)."""
    targets = []
    for example, image in zip(examples, images):
        width, height = image.size
        boxes = torch.tensor(example["boxes"], dtype=torch.float32).reshape(-1, 4) / torch.tensor([width, height] * 2)
        cxcywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)  # (N, 4)
        labels = torch.tensor([names.index(label) for label in example["labels"]], dtype=torch.long)
        targets.append({"class_labels": labels, "boxes": cxcywh})
    return targets


def dfine_detections(model, processor, images, names: list[str], top: int = 100) -> list[dict]:
    """RT-DETR / D-FINE post-processing: the top `top` (query, class) sigmoid scores, boxes to image pixels."""
    with torch.inference_mode():
        output = model(pixel_values=dfine_pixels(processor, images))
    scores = output.logits.sigmoid().flatten(1)  # (B, Q*C)
    best, index = scores.topk(min(top, scores.shape[1]), dim=1)
    classes, queries = index % len(names), index // len(names)
    results = []
    for b, image in enumerate(images):
        cx, cy, w, h = output.pred_boxes[b, queries[b]].unbind(-1)
        box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0, 1)
        box = box * torch.tensor([image.width, image.height] * 2)
        results.append({"boxes": box.tolist(), "labels": [names[c] for c in classes[b].tolist()],
                        "scores": best[b].tolist()})
    return results


def dfine_run(sources_config, processor, names: list[str], seconds: float, examples, lr: float = DFINE_LR) -> Run:
    """D-FINE on the dense run's stream of scenes (same draws, same order), its own loss, for `seconds`."""
    model = dfine_model(len(names)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    mixture = Mixture(build_sources(sources_config), task_quotas(sources_config.tasks, BATCH))
    position = [0]

    def step() -> None:
        batch = mixture.micro_batch(position[0], 0, 1)
        images = [load_image(e["image"]) for e in batch]
        position[0] += 1
        loss = model(pixel_values=dfine_pixels(processor, images), labels=dfine_targets(batch, images, names)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    steps = train_for(step, seconds)
    model.eval()
    images = [load_image(e["image"]) for e in examples]
    found = [d for i in range(0, len(images), BATCH)
             for d in dfine_detections(model, processor, images[i:i + BATCH], names)]
    map50 = coco_map(found, [{"boxes": e["boxes"], "labels": e["labels"]} for e in examples])["map50"]

    def predict(images, batch):
        return [d for i in range(0, len(images), batch)
                for d in dfine_detections(model, processor, images[i:i + batch], names)]
    return Run("D-FINE (transformers)", sum(p.numel() for p in model.parameters()), steps, map50, predict)


def detector_run(model, steps: int, examples) -> Run:
    """The dense run's model extracted and fused, served by transformers' object-detection pipeline."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = ofa_ufo.extract_dense_detector(model, fuse=True)
    image_processor = ofa_ufo.OFAUFODetectorImageProcessor(size=detector.config.image_size)
    detect = pipeline("object-detection", model=detector, image_processor=image_processor)

    def predict(images, batch):
        found = detect(images, threshold=0.05, batch_size=batch)
        return [{"boxes": [[r["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for r in rows],
                 "labels": [r["label"] for r in rows], "scores": [r["score"] for r in rows]} for rows in found]

    found = predict([load_image(e["image"]) for e in examples], BATCH)
    map50 = coco_map(found, [{"boxes": e["boxes"], "labels": e["labels"]} for e in examples])["map50"]
    params = sum(p.numel() for p in detector.parameters())
    return Run("dense_detection, extracted + fused (object-detection pipeline)", params, steps, map50, predict)


def images_per_second(predict, images, batch: int, repeats: int) -> float:
    """Median images/s of `predict` over all `images` in batches of `batch`, after one warm-up call."""
    predict(images[:batch], batch)
    times = [time_call(lambda: predict(images, batch)) for _ in range(repeats)]
    return len(images) / statistics.median(times)


def print_runs(runs: list[Run], images, repeats: int) -> None:
    print("\n| detector | params (M) | train steps | mAP@0.5 | images/s batch 1 | images/s batch 8 |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        speeds = [images_per_second(run.predict, images, batch, repeats) for batch in (1, 8)]
        print(f"| {run.name} | {run.params / 1e6:.2f} | {run.steps} | {run.map50:.3f} | {speeds[0]:.1f} | "
              f"{speeds[1]:.1f} |")


def print_fusion(model, repeats: int, targets: tuple[str, ...]) -> None:
    """The extracted detector of the dense run: unfused vs fused on `targets`, batch 1 and 8."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unfused = ofa_ufo.extract_dense_detector(model)
        fused = ofa_ufo.extract_dense_detector(model, fuse=True)
    print("\n| extracted detector | target | batch 1 (ms) | batch 8 (ms) |")
    print("|---|---|---|---|")
    for target, (name, detector) in [(t, d) for t in targets for d in (("unfused", unfused), ("fused", fused))]:
        ms = [measure_detector_latency(detector, target, batch, repeats, 1).ms for batch in (1, 8)]
        print(f"| {name} | {target} | {ms[0]:.1f} | {ms[1]:.1f} |")


def head_ms(detector, repeats: int) -> tuple[float, float]:
    """Median ms of the neck + head alone, unfused and fused (batch 1, PyTorch), on the encoder features of one
    random image; the two are timed in alternation, so that load from other processes hits both alike."""
    size = detector.config.image_size
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (1, 3, S, S)
    unfused, fused = detector.dense_head, fuse_reparam(copy.deepcopy(detector.dense_head))
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    with torch.inference_mode():
        features = image_pyramid(detector.stem, detector.supernet, pixels, None, detector.config.image_bucket_size)
        unfused(*features), fused(*features)  # warm-up
        for _ in range(4 * repeats):
            times["unfused"].append(time_call(lambda: unfused(*features)))
            times["fused"].append(time_call(lambda: fused(*features)))
    return 1e3 * statistics.median(times["unfused"]), 1e3 * statistics.median(times["fused"])


def print_presets(names: list[str], presets: list[str], repeats: int, recipe: Recipe) -> None:
    """Parameters (whole detector, and neck + head alone), the fused detector's latency, and the neck + head's
    latency unfused vs fused, of each preset (random weights: latency does not depend on them)."""
    print("\n| preset | detector params (M) | neck + head params (M) | fused detector cpu-fp32 batch 1 (ms) | "
          "neck + head unfused (ms) | neck + head fused (ms) |")
    print("|---|---|---|---|---|---|")
    for preset in presets:
        torch.manual_seed(0)
        model = ofa_ufo.create_model("ofa_ufo_tiny", **recipe.model_overrides(),
                                     dense_head={"preset": preset, "labels": names})
        detector = ofa_ufo.extract_dense_detector(model.eval())
        unfused_head, fused_head = head_ms(detector, repeats)
        detector.fuse()
        params = sum(p.numel() for p in detector.parameters()) / 1e6
        head = sum(p.numel() for p in detector.dense_head.parameters()) / 1e6
        ms = measure_detector_latency(detector, "cpu-fp32", 1, repeats, 1).ms
        print(f"| {preset} | {params:.2f} | {head:.2f} | {ms:.1f} | {unfused_head:.2f} | {fused_head:.2f} |")


def dense_probe(args: argparse.Namespace, recipe: Recipe) -> int:
    """The dense run alone, scored `args.dense_only` times at equal shares of `args.seconds` (which recipe learns
    fastest: stem, preset, LR)."""
    with tempfile.TemporaryDirectory(prefix="dense_bench_") as workdir:
        config = train_config("dense_detection", workdir, args.eval_examples, recipe)
        trainer = Trainer(config, resume="never")
        examples, spec = eval_examples(config, "dense_detection")
        start = time.perf_counter()
        for k in range(1, args.dense_only + 1):
            step = trainer_step(trainer)
            while time.perf_counter() - start < args.seconds * k / args.dense_only:
                step()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = evaluate_model(trainer.unwrapped.eval(), trainer.processor, spec, examples,
                                        batch_size=BATCH).values
            print(f"dense {recipe.dense_preset} over {recipe.resnet}, LR {recipe.dense_lr:g}: "
                  f"{time.perf_counter() - start:.0f} s, {trainer.step} steps, mAP@0.5 {scores['map50']:.3f}",
                  flush=True)
    return 0


def dfine_probe(args: argparse.Namespace, recipe: Recipe) -> int:
    """D-FINE alone on the same scenes and held-out set (its classes from the dense run's data)."""
    with tempfile.TemporaryDirectory(prefix="dense_bench_") as workdir:
        config = train_config("dense_detection", workdir, args.eval_examples, recipe)
        trainer = Trainer(config, resume="never")
    names = list(trainer.unwrapped.config.dense_head["labels"])
    run = dfine_run(config, trainer.processor, names, args.seconds, eval_examples(config, "dense_detection")[0],
                    args.dfine_lr)
    print(f"D-FINE (transformers), LR {args.dfine_lr:g}: {run.params / 1e6:.2f} M parameters, {run.steps} steps, "
          f"mAP@0.5 {run.map50:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="training wall time of each detector")
    parser.add_argument("--eval-examples", type=int, default=100, help="held-out scenes scored")
    parser.add_argument("--images", type=int, default=16, help="images timed for images/s")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--resnet", default=Recipe.resnet, help="the OFA-UFO runs' ResNet stem")
    parser.add_argument("--dense-preset", default=Recipe.dense_preset, choices=sorted(DENSE_PRESETS),
                        help="the dense head trained against the others")
    parser.add_argument("--dense-lr", type=float, default=DENSE_LR, help="the dense run's LR")
    parser.add_argument("--no-dfine", action="store_true", help="leave the D-FINE row out")
    parser.add_argument("--dfine-lr", type=float, default=DFINE_LR, help="D-FINE's AdamW LR (its recipe: 2e-4)")
    parser.add_argument("--dense-only", type=int, default=0, metavar="K",
                        help="train the dense head alone (a recipe probe), its mAP printed K times along the way")
    parser.add_argument("--dfine-only", action="store_true",
                        help="train and score D-FINE alone (a probe of its recipe), no other table")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run, figures meaningless)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.eval_examples, args.images, args.repeats = 2.0, 4, 8, 1
    recipe = Recipe(args.resnet, args.dense_preset, args.dense_lr)
    torch.set_num_threads(args.threads)
    print(device_name("cpu"), "|", precision_support("cpu").summary)
    print(f"demo scenes, ofa_ufo_tiny at {IMAGE_SIZE} px over {recipe.resnet}, dense head {recipe.dense_preset} "
          f"(LR {recipe.dense_lr:g}), generative LR {LR:g}, batch {BATCH}, fp32, {args.seconds:.0f} s of training "
          f"each, {args.eval_examples} held-out scenes")
    if args.dfine_only:
        return dfine_probe(args, recipe)
    if args.dense_only:
        return dense_probe(args, recipe)
    with tempfile.TemporaryDirectory(prefix="dense_bench_") as workdir:
        generative, _, _ = ofa_run("detection", args.seconds, args.eval_examples, workdir, recipe)
        dense, model, processor = ofa_run("dense_detection", args.seconds, args.eval_examples, workdir, recipe)
    config = train_config("dense_detection", "unused", args.eval_examples, recipe)
    examples, _ = eval_examples(config, "dense_detection")
    if [e["boxes"] for e in examples] != [e["boxes"] for e in eval_examples(config, "detection")[0]]:
        raise RuntimeError("the two tasks' held-out scenes differ: the comparison would not be like for like")
    runs = [generative, dense, detector_run(model, dense.steps, examples)]
    names = list(model.config.dense_head["labels"])
    if not args.no_dfine:
        runs.append(dfine_run(config, processor, names, args.seconds, examples, args.dfine_lr))
    images = [load_image(e["image"]) for e in examples][: args.images]
    images = (images * args.images)[: args.images]
    print_runs(runs, images, args.repeats)
    print_fusion(model, args.repeats, ("cpu-fp32",) if args.quick else ("cpu-fp32", "onnx-cpu"))
    print_presets(names, ["tiny"] if args.quick else list(DENSE_PRESETS), args.repeats, recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
