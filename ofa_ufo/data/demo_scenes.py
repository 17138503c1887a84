"""Procedurally generated shape scenes: the offline demo data.

A tiny model must learn captioning, VQA, grounding (one, several or no objects),
detection, classification, entailment, image-text matching and grounded captioning from
these within minutes of CPU training, and tests must never download anything. So scenes
are a handful of flat-coloured shapes (optionally partly occluding each other) on a lightly
textured background, generated from a seed, with every fact about them (shape, colour,
amodal box) known exactly.

This module samples and draws the scenes; :mod:`ofa_ufo.data.demo_examples` turns a scene
into one example per task.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 75, 225),
    "yellow": (245, 220, 35),
    "purple": (145, 50, 185),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

# Neutral tones far from every object colour, so no object ever blends into the background.
BACKGROUNDS: dict[str, RGB] = {
    "gray": (128, 128, 128),
    "beige": (210, 195, 160),
    "slate": (70, 85, 100),
    "sage": (150, 172, 140),
}

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)

# Words that tell apart 2 or 3 identical objects, left to right (duplicates are capped at 3).
POSITION_WORDS: dict[int, tuple[str, ...]] = {
    2: ("left", "right"),
    3: ("left", "middle", "right"),
}

MIN_SIDE, MAX_SIDE = 0.15, 0.45  # object side as a fraction of the image side
DEFAULT_OBJECT_SIZE: tuple[float, float] = (MIN_SIDE, MAX_SIDE)
GAP = 4  # minimum free pixels between two objects
MAX_NOISE = 6  # per-pixel background noise amplitude (grey levels)
MAX_GRADIENT = 20  # background brightness ramp amplitude (grey levels)
PLACEMENT_TRIES = 40  # random placements tried per requested object
MAX_OCCLUSION = 0.5  # beyond this an occluded shape may no longer be recognisable


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    """Vertices of a point-up star, alternating outer and inner radius."""
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    radii = [1.0 if k % 2 == 0 else inner for k in range(2 * points)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]


def _to_unit_box(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Stretch a polygon so its bounding box is exactly [0, 1]^2 (the shape fills its box)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    return tuple(((x - min(xs)) / w, (y - min(ys)) / h) for x, y in points)


_T = 1 / 3  # cross arm thickness
_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": _to_unit_box([(0, 0), (1, 0), (1, 1), (0, 1)]),
    "triangle": _to_unit_box([(0.5, 0), (1, 1), (0, 1)]),
    "diamond": _to_unit_box([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]),
    "star": _to_unit_box(_star()),
    "cross": _to_unit_box([
        (_T, 0), (1 - _T, 0), (1 - _T, _T), (1, _T), (1, 1 - _T), (1 - _T, 1 - _T),
        (1 - _T, 1), (_T, 1), (_T, 1 - _T), (0, 1 - _T), (0, _T), (_T, _T),
    ]),
}


@dataclass
class SceneObject:
    """One drawn shape; `box` is (x0, y0, x1, y1) in pixels and tightly encloses it.

    Boxes are amodal: they cover the shape's full extent even where a later (higher
    `layer`) object partly hides it, as in COCO-style annotation of occluded objects.
    """

    shape: str
    color: str
    box: Box
    layer: int = 0  # drawing order: higher layers are drawn on top

    @property
    def name(self) -> str:
        """Detection label, e.g. "red circle"."""
        return f"{self.color} {self.shape}"

    @property
    def area(self) -> float:
        """Box area in pixels, used to pick the classification label."""
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


@dataclass
class Scene:
    """A generated image and the ground truth about it; `objects` run left to right."""

    image: Image.Image
    objects: list[SceneObject]
    background: str


def _background(rng: np.random.Generator, size: int) -> tuple[str, Image.Image]:
    """A neutral colour with a soft brightness ramp and light grey noise."""
    names = list(BACKGROUNDS)
    name = names[rng.integers(len(names))]
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32) * rng.uniform(0, MAX_GRADIENT)
    ramp = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]  # (H|1, W|1, 1)
    noise = rng.integers(-MAX_NOISE, MAX_NOISE + 1, size=(size, size, 1), dtype=np.int16)
    # colour + ramp + noise, one channel plane at a time: the same float32 sums as on (H, W, 3), without
    # numpy's slow broadcast over a last axis of 3 (scenes are generated at every training step)
    shaded = np.asarray(BACKGROUNDS[name], np.float32) + ramp  # (H|1, W|1, 3)
    grain = noise[..., 0].astype(np.float32)  # (H, W)
    planes = []
    for channel in range(3):
        plane = shaded[..., channel] + grain  # (H, W)
        np.clip(plane, 0, 255, out=plane)
        planes.append(Image.fromarray(plane.astype(np.uint8)))  # mode L
    return name, Image.merge("RGB", planes)


def _random_object(rng: np.random.Generator, size: int, object_size: tuple[float, float]) -> SceneObject:
    """A random shape and colour in a random square box inside the image."""
    side = int(rng.integers(round(object_size[0] * size), round(object_size[1] * size) + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    return SceneObject(shape, color, (float(x0), float(y0), float(x0 + side), float(y0 + side)))


def _apart(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two 1-D intervals are at least GAP pixels apart."""
    return a[1] + GAP <= b[0] or b[1] + GAP <= a[0]


def _intersection(a: Box, b: Box) -> float:
    """Area shared by two boxes (0 when disjoint)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)


def _conflicts(a: SceneObject, b: SceneObject, occlusion: float) -> bool:
    """Too much overlap, or identical objects not side by side (so "left"/"right" work).

    With `occlusion` 0 objects keep GAP pixels apart; otherwise they may share up to that
    fraction of the smaller box.
    """
    apart_x = _apart((a.box[0], a.box[2]), (b.box[0], b.box[2]))
    if a.name == b.name:
        return not apart_x
    if occlusion == 0:
        return not (apart_x or _apart((a.box[1], a.box[3]), (b.box[1], b.box[3])))
    return _intersection(a.box, b.box) > occlusion * min(a.area, b.area)


def hidden_fraction(obj: SceneObject, objects: Sequence[SceneObject]) -> float:
    """Upper bound on the share of `obj`'s box covered by objects drawn above it."""
    covered = sum(_intersection(obj.box, o.box) for o in objects if o.layer > obj.layer)
    return covered / obj.area


def _fits(candidate: SceneObject, objects: list[SceneObject], occlusion: float) -> bool:
    """No conflicts, at most 3 twins, and no object hidden beyond `occlusion` in total."""
    twins = sum(o.name == candidate.name for o in objects)
    if twins >= max(POSITION_WORDS) or any(_conflicts(candidate, o, occlusion) for o in objects):
        return False
    stack = [*objects, candidate]
    return all(hidden_fraction(o, stack) <= occlusion for o in objects)


def _left_to_right(obj: SceneObject) -> tuple[float, float]:
    x0, y0, x1, y1 = obj.box
    return (x0 + x1, y0 + y1)


def _place_objects(
    rng: np.random.Generator, size: int, count: int, occlusion: float, object_size: tuple[float, float]
) -> list[SceneObject]:
    """Rejection-sample up to `count` objects (the first always fits), in drawing order."""
    objects: list[SceneObject] = []
    for _ in range(count * PLACEMENT_TRIES):
        candidate = _random_object(rng, size, object_size)
        candidate.layer = len(objects)
        if _fits(candidate, objects, occlusion):
            objects.append(candidate)
            if len(objects) == count:
                break
    return objects


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    """Fill the shape so its pixels span exactly [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = obj.box
    w, h = x1 - 1 - x0, y1 - 1 - y0  # PIL coordinates are inclusive pixel centres
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
    else:
        draw.polygon([(x0 + u * w, y0 + v * h) for u, v in _POLYGONS[obj.shape]], fill=fill)


def generate_scene(
    rng: np.random.Generator,
    size: int = 256,
    max_objects: int = 3,
    occlusion: float = 0.0,
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
) -> Scene:
    """Draw 1..max_objects shapes (no antialiasing, so colours stay exact).

    `occlusion` > 0 lets a later shape cover up to that fraction of an earlier one (and of
    the smaller of the two boxes); 0 keeps shapes apart. Boxes stay amodal (full extent).
    `object_size` is the (min, max) side of an object's box as a fraction of the image side:
    larger objects keep their shapes legible on a coarse grid (an 8 x 8 VQGAN code grid).
    """
    if not 1 <= max_objects < len(NUMBER_WORDS):
        raise ValueError(f"max_objects must be in [1, {len(NUMBER_WORDS) - 1}], got {max_objects}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 0.0 <= occlusion <= MAX_OCCLUSION:
        raise ValueError(f"occlusion must be in [0, {MAX_OCCLUSION}], got {occlusion}")
    check_object_size(object_size)
    background, image = _background(rng, size)
    objects = _place_objects(rng, size, int(rng.integers(1, max_objects + 1)), occlusion, object_size)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return Scene(image, sorted(objects, key=_left_to_right), background)


def check_object_size(object_size: Sequence[float]) -> None:
    """ValueError unless `object_size` is (min, max) with 0 < min <= max <= 1 (fractions of the side)."""
    if len(object_size) != 2 or not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(f"object_size must be (min, max) fractions of the image side with 0 < min <= max <= 1, "
                         f"got {tuple(object_size)}")


def class_names() -> list[str]:
    """Classification labels (shape names), sorted."""
    return sorted(SHAPES)


def detection_labels() -> list[str]:
    """Every "colour shape" detection label, colour-major in table order."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


class DemoScenes(Dataset):
    """A deterministic, lazily generated split of demo scenes.

    Scene i of a split comes from its own seed (seed, split, i), so any item regenerates
    alone, in any order or worker, and splits never share scenes.
    """

    def __init__(
        self,
        split: str = "train",
        num_scenes: int = 1000,
        size: int = 256,
        seed: int = 0,
        max_objects: int = 3,
        occlusion: float = 0.0,
        object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
    ) -> None:
        if num_scenes < 0 or seed < 0:
            raise ValueError("num_scenes and seed must be non-negative")
        check_object_size(object_size)
        self.split, self.num_scenes, self.size = split, num_scenes, size
        self.seed, self.max_objects, self.occlusion = seed, max_objects, occlusion
        self.object_size = (float(object_size[0]), float(object_size[1]))

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> Scene:
        rng = self._rng(index, stream=0)
        return generate_scene(rng, self.size, self.max_objects, self.occlusion, self.object_size)

    def example_rng(self, index: int, epoch: int = 0) -> np.random.Generator:
        """A generator for building scene `index`'s task examples: fixed per epoch, so a
        validation set is stable while training sees new questions each epoch."""
        return self._rng(index, stream=1 + epoch)

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if not -self.num_scenes <= index < self.num_scenes:
            raise IndexError(f"scene {index} out of range for {self.num_scenes} scenes")
        key = (self.seed, zlib.crc32(self.split.encode()), index % self.num_scenes, stream)
        return np.random.default_rng(np.random.SeedSequence(key))
