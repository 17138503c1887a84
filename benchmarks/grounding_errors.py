"""Which object a grounding model picked on the demo scenes, and why it missed: an error breakdown of
`python -m ofa_ufo.evaluate --output` predictions, one row per predictions file.

    .venv/bin/python -m ofa_ufo.evaluate --spec benchmarks/specs/demo_grounding_1000.yaml --model DIR --limit 300 \
        --output /tmp/alone.json
    .venv/bin/python benchmarks/grounding_errors.py --spec benchmarks/specs/demo_grounding_1000.yaml \
        /tmp/alone.json /tmp/taught.json

acc@0.5 says how often a box hits its referent; this says what the other boxes hit. Every prediction is
matched to the scene object its box overlaps most (IoU >= 0.5, else "no object"), and that object is the
referent ("right"), its twin (same colour and shape: the position word was missed), an object of the
referent's shape or colour only (one attribute missed), or an unrelated object (neither: the prompt was
not read). A model that ignores the prompt falls back to a fixed habit; `leftmost` counts the wrong-object
picks that are the scene's leftmost object, the first box of a demo detection target.
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

from ofa_ufo.data.demo_scenes import DemoScenes, SceneObject
from ofa_ufo.data.sources import DemoScenesOptions, open_examples
from ofa_ufo.data.specs import TaskSpec, load_spec

KINDS = ("right", "twin", "same shape", "same colour", "unrelated", "no object")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="the demo grounding spec the predictions were made on")
    parser.add_argument("predictions", nargs="+", type=Path, help="JSON written by ofa_ufo.evaluate --output")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
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
