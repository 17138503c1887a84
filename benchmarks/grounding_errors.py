"""Which object a grounding model picked on the demo scenes, and why it missed: an error breakdown of
`python -m ofa_ufo.evaluate --output` predictions, one row per predictions file.

    .venv/bin/python -m ofa_ufo.evaluate --spec benchmarks/specs/demo_grounding_1000.yaml --model DIR --limit 300 \
        --output /tmp/alone.json
    .venv/bin/python benchmarks/grounding_errors.py --spec benchmarks/specs/demo_grounding_1000.yaml \
        /tmp/alone.json /tmp/taught.json
    .venv/bin/python benchmarks/grounding_errors.py --spec benchmarks/specs/demo_grounding_1000.yaml --models DIR...

acc@0.5 says how often a box hits its referent; this says what the other boxes hit. Every prediction is
matched to the scene object its box overlaps most (IoU >= 0.5, else "no object"), and that object is the
referent ("right"), its twin (same colour and shape: the position word was missed), an object of the
referent's shape or colour only (one attribute missed), or an unrelated object (neither: the prompt was
not read). A model that ignores the prompt falls back to a fixed habit; `leftmost` counts the wrong-object
picks that are the scene's leftmost object, the first box of a demo detection target.

`--models`: whether a model's encoder reads the phrase into the image tokens. On the scenes with two or more
objects, the same image is encoded with the phrases of its first and of its second object, and the change of
the encoder's output at the image positions is printed relative to its size (mean over scenes). Near 0: the
image tokens are the same whatever is asked, and which object gets boxed is left to the decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor

from ofa_ufo.data.demo_examples import referring_expression
from ofa_ufo.data.demo_scenes import DemoScenes, SceneObject
from ofa_ufo.data.sources import DemoScenesOptions, open_examples
from ofa_ufo.data.specs import TaskSpec, load_spec
from ofa_ufo.hf.modeling import OFAUFOForConditionalGeneration
from ofa_ufo.metrics.grounding import box_iou
from ofa_ufo.tasks import get_task

KINDS = ("right", "twin", "same shape", "same colour", "unrelated", "no object")


def classify(box: Sequence[float] | None, referent: SceneObject, objects: Sequence[SceneObject]) -> tuple[str, bool]:
    """(kind, whether the picked object is the scene's leftmost) of one predicted box; a missing box or one
    that overlaps no object by IoU >= 0.5 is "no object"."""
    if box is None:
        return "no object", False
    picked = max(objects, key=lambda o: box_iou(box, o.box))
    if box_iou(box, picked.box) < 0.5:
        return "no object", False
    leftmost = picked is min(objects, key=lambda o: o.box[0])
    if picked is referent:
        return "right", leftmost
    if picked.name == referent.name:
        return "twin", leftmost
    if picked.shape == referent.shape:
        return "same shape", leftmost
    if picked.color == referent.color:
        return "same colour", leftmost
    return "unrelated", leftmost


def demo_scenes(spec: TaskSpec) -> DemoScenes:
    """The spec's held-out scenes; a clear error for a spec that is not single-object demo grounding."""
    if spec.task != "grounding" or spec.data.get("source") != "demo_scenes":
        raise SystemExit(f"spec {spec.name!r}: needs task grounding on source demo_scenes, got task {spec.task!r} "
                         f"on {spec.data.get('source') or spec.data.get('format')!r}")
    names = {f.name for f in dataclasses.fields(DemoScenesOptions)}
    options = DemoScenesOptions(**{k: v for k, v in spec.data.items() if k in names})
    if options.task_options:
        raise SystemExit(f"spec {spec.name!r}: task_options {options.task_options} make multi-object or empty "
                         "examples; the breakdown takes single-object grounding only")
    return DemoScenes("val", options.val_scenes, size=options.size, seed=options.seed,
                      max_objects=options.max_objects, object_size=tuple(options.object_size))


def breakdown(spec: TaskSpec, predictions: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Counts of each kind in `KINDS` and of `leftmost` wrong-object picks over the predictions, matched to
    the spec's examples by id (``val-<index>``)."""
    scenes = demo_scenes(spec)
    examples = {e["id"]: e for e in open_examples(spec.data, "grounding")}
    counts = Counter(dict.fromkeys([*KINDS, "leftmost"], 0))
    for prediction in predictions:
        example = examples.get(prediction["id"])
        if example is None:
            raise SystemExit(f"prediction id {prediction['id']!r} is not an example of spec {spec.name!r}")
        objects = scenes[int(prediction["id"].split("-")[1])].objects
        referent = next(o for o in objects if tuple(o.box) == tuple(example["box"]))
        boxes = prediction.get("boxes") or [None]
        kind, leftmost = classify(boxes[0], referent, objects)
        counts[kind] += 1
        counts["leftmost"] += int(leftmost and kind not in ("right", "no object"))
    return dict(counts)


@torch.no_grad()
def prompt_dependence(model_dir: str, spec: TaskSpec, scenes: int = 60) -> tuple[float, int]:
    """(mean over the first `scenes` scenes with 2+ objects of |states(phrase 1) - states(phrase 0)| /
    |states(phrase 0)| at the encoder's image positions, how many scenes that was)."""
    model = OFAUFOForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    task, generated = get_task("grounding"), demo_scenes(spec)
    route = torch.full((2,), model.config.vision_config.route_id("grounding"), dtype=torch.long)  # (2,)
    changes = []
    for index in range(min(scenes, len(generated))):
        scene = generated[index]
        if len(scene.objects) < 2:
            continue
        prompts = [task.prompt(referring_expression(scene, k), spec.prompt_style) for k in range(2)]
        inputs = processor(images=[scene.image, scene.image], text=prompts)
        states = model.model.encoder(**inputs, task_ids=route).last_hidden_state  # (2, n + T, D)
        image = states[:, : states.shape[1] - inputs["input_ids"].shape[1]]  # (2, n, D): image tokens lead
        changes.append(float((image[1] - image[0]).norm() / image[0].norm()))
    if not changes:
        raise SystemExit(f"spec {spec.name!r}: none of its first {scenes} scenes has two objects")
    return sum(changes) / len(changes), len(changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="the demo grounding spec the predictions were made on")
    parser.add_argument("predictions", nargs="*", type=Path, help="JSON written by ofa_ufo.evaluate --output")
    parser.add_argument("--models", nargs="+", default=[], metavar="DIR",
                        help="print how much each model's image tokens change with the phrase")
    parser.add_argument("--scenes", type=int, default=60, help="with --models: the scenes looked at")
    args = parser.parse_args(argv)
    if not args.predictions and not args.models:
        parser.error("give predictions JSON files, --models, or both")
    spec = load_spec(args.spec)
    if args.models:
        print("| model | image tokens' change between two phrases (relative) | scenes |")
        print("|---|---|---|")
        for model_dir in args.models:
            change, count = prompt_dependence(model_dir, spec, args.scenes)
            print(f"| {model_dir} | {change:.4f} | {count} |")
    if not args.predictions:
        return 0
    print(f"| predictions | scored | {' | '.join(KINDS)} | wrong-object picks that are the leftmost object |")
    print(f"|---|---|{'---|' * len(KINDS)}---|")
    for path in args.predictions:
        predictions = json.loads(path.read_text())["predictions"]
        counts = breakdown(spec, predictions)
        wrong = sum(counts[k] for k in ("twin", "same shape", "same colour", "unrelated"))
        print(f"| {path} | {len(predictions)} | {' | '.join(str(counts[k]) for k in KINDS)} | "
              f"{counts['leftmost']} of {wrong} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
