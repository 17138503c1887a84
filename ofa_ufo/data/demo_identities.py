"""Procedurally generated identities: the offline demo data of the embedding tasks.

The AllInOne tasks (``reid_person``, ``reid_vehicle``, ``face``, ``product``) learn *who* or
*which* object an image shows, so their demo data need many identities, several images of
each, and images of one identity that differ the way real photographs do. Here an identity is
an integer that deterministically fixes an object's look (:func:`appearance`):

* person: skin, hair style and colour, top colour with a stripe / check / band pattern, sleeve
  length, trousers / shorts / skirt, shoes, an optional backpack or handbag, build;
* vehicle (side view): body type (sedan, hatchback, SUV, van, truck), body colour, two-tone
  roof, decal stripe, window tint, wheel size and rims, roof rack;
* face: face shape and skin, hair style and colour, eye colour and spacing, eyebrows, nose,
  mouth, glasses, beard;
* product: a category (bottle, box, mug, can, lamp, chair = SOP's super class), body and
  accent colours, and a label with its own colours and pattern.

Each image of an identity (a *view*) is rendered with its own random viewpoint (horizontal
flip, small rotation, aspect change), scale and crop, colour jitter, noise, and a camera whose
background, clutter and illumination tint are fixed per camera. ReID examples carry the camera
id in ``meta`` as the Market-1501 loader does.

No face photographs with identity labels ship in an installable package (matplotlib's
``grace_hopper.jpg`` and scikit-image's ``astronaut.png`` are one person each; scikit-image's
``lfw_subset`` holds 100 unlabelled 25x25 faces), so faces are procedural too.

Examples follow :mod:`ofa_ufo.data.loaders.reid`:

==================  ==========================================================================
task                ``meta``
==================  ==========================================================================
``reid_person``,    ``dataset`` (``demo_person`` / ``demo_vehicle``), ``identity`` (int),
``reid_vehicle``    ``camera`` (int, from 1), ``split`` (``train``, ``query``, ``gallery``)
``face``            ``dataset``, ``identity``; held out: ``pair``, ``side``, ``same``, ``fold``
``product``         ``dataset``, ``identity``, ``super_class``, ``image_id``, ``split``
==================  ==========================================================================

Training identities are numbered from 1 (:class:`DemoIdentities`); held-out identities
(:func:`held_out_examples`) from ``HELD_OUT_OFFSET + 1``, so the two never share an identity.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Hashable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ofa_ufo.data.canonical import IDENTITY_TASKS, new_example

__all__ = [
    "CAMERAS", "HELD_OUT_OFFSET", "PRODUCT_CLASSES", "TRAIN_VIEWS", "DemoIdentities", "appearance",
    "held_out_examples", "render_view",
]

CAMERAS: dict[str, int] = {"person": 6, "vehicle": 8, "face": 4, "product": 4}  # Market-1501 has 6 cameras
PRODUCT_CLASSES: tuple[str, ...] = ("bottle", "box", "mug", "can", "lamp", "chair")
VEHICLE_TYPES: tuple[str, ...] = ("sedan", "hatchback", "suv", "van", "truck")
HELD_OUT_OFFSET = 1_000_000
TRAIN_VIEWS = 8  # images per training identity
DEFAULT_SIZE = 128
RGB = tuple[int, int, int]
_SKIN = ((255, 224, 196), (241, 194, 160), (224, 172, 135), (198, 134, 94), (160, 100, 66), (111, 72, 48))
_HAIR = ((20, 18, 18), (70, 45, 30), (120, 80, 45), (200, 160, 90), (160, 60, 30), (150, 150, 150))


# ---- randomness -----------------------------------------------------------------------------------

def _rng(*key: int | str) -> np.random.Generator:
    """A generator fixed by its key (strings hashed with crc32)."""
    ints = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
    return np.random.default_rng(np.random.SeedSequence(ints))


def _colour(rng: np.random.Generator, saturation=(0.35, 1.0), value=(0.25, 1.0)) -> RGB:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return tuple(int(round(255 * c)) for c in rgb)


def _jitter(rng: np.random.Generator, base: RGB, amount: int = 18) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in base)


def _kind(task: str) -> str:
    """The kind of object `task` identifies (the task's `identity_kind`), when identities of it are drawn here."""
    if IDENTITY_TASKS.get(task) not in _LOOKS:
        known = sorted(t for t, kind in IDENTITY_TASKS.items() if kind in _LOOKS)
        raise ValueError(f"no demo identities for task {task!r}; they exist for {known}")
    return IDENTITY_TASKS[task]


# ---- appearance: everything an identity fixes -----------------------------------------------------

def _person_look(rng: np.random.Generator) -> dict[str, Any]:
    return dict(skin=_jitter(rng, _SKIN[rng.integers(len(_SKIN))]), hair=_jitter(rng, _HAIR[rng.integers(len(_HAIR))]),
                hair_style=int(rng.integers(4)), top=_colour(rng), pattern=int(rng.integers(5)),
                pattern_colour=_colour(rng), period=int(rng.integers(3, 7)), long_sleeves=bool(rng.random() < 0.5),
                bottom=_colour(rng, value=(0.15, 0.9)), bottom_style=int(rng.integers(3)),
                shoes=_colour(rng, value=(0.1, 0.8)), bag=int(rng.integers(3)), bag_colour=_colour(rng),
                build=float(rng.uniform(0.42, 0.62)), head=float(rng.uniform(0.9, 1.15)))


def _vehicle_look(rng: np.random.Generator) -> dict[str, Any]:
    body = _colour(rng, saturation=(0.0, 1.0), value=(0.15, 1.0))
    return dict(type=int(rng.integers(len(VEHICLE_TYPES))), body=body,
                roof=_colour(rng) if rng.random() < 0.35 else body, cargo=_colour(rng),
                stripe=_colour(rng) if rng.random() < 0.5 else None, window=_colour(rng, value=(0.1, 0.45)),
                wheel=float(rng.uniform(0.1, 0.15)), rim=_colour(rng, saturation=(0.0, 0.4)),
                rack=bool(rng.random() < 0.3), length=float(rng.uniform(0.85, 1.0)), height=float(rng.uniform(0.85, 1.15)))


def _face_look(rng: np.random.Generator) -> dict[str, Any]:
    return dict(skin=_jitter(rng, _SKIN[rng.integers(len(_SKIN))], 25), hair=_jitter(rng, _HAIR[rng.integers(len(_HAIR))], 30),
                hair_style=int(rng.integers(5)), width=float(rng.uniform(0.46, 0.62)), height=float(rng.uniform(0.62, 0.78)),
                eyes=_colour(rng, value=(0.2, 0.8)), eye_gap=float(rng.uniform(0.16, 0.24)),
                eye_size=float(rng.uniform(0.035, 0.06)), eye_y=float(rng.uniform(0.43, 0.5)),
                brow=int(rng.integers(1, 4)), nose=float(rng.uniform(0.07, 0.14)), mouth=float(rng.uniform(0.1, 0.2)),
                mouth_style=int(rng.integers(3)), lips=_jitter(rng, (170, 70, 70), 40),
                glasses=_colour(rng, value=(0.0, 0.6)) if rng.random() < 0.3 else None,
                beard=bool(rng.random() < 0.25))


def _product_look(rng: np.random.Generator) -> dict[str, Any]:
    return dict(category=int(rng.integers(len(PRODUCT_CLASSES))), body=_colour(rng, saturation=(0.0, 1.0)),
                accent=_colour(rng), label=_colour(rng), label_pattern=int(rng.integers(4)), ink=_colour(rng),
                period=int(rng.integers(3, 7)), width=float(rng.uniform(0.8, 1.1)), height=float(rng.uniform(0.85, 1.1)))


_LOOKS = {"person": _person_look, "vehicle": _vehicle_look, "face": _face_look, "product": _product_look}


def appearance(task: str, identity: int, seed: int = 0) -> dict[str, Any]:
    """The look identity `identity` of `task` has in every image (a pure function of its arguments)."""
    return _look(_kind(task), identity, seed)


def _look(kind: str, identity: int, seed: int) -> dict[str, Any]:
    return _LOOKS[kind](_rng(seed, kind, "look", identity))


# ---- drawing the identity (an RGBA template: the object on a transparent canvas) ------------------

def _pattern(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], kind: int, colour: RGB,
             period: int) -> None:
    """0 solid, 1 horizontal stripes, 2 vertical stripes, 3 checks, 4 a band across the middle."""
    x0, y0, x1, y1 = box
    step = max(2, period)
    if kind == 1:
        for y in np.arange(y0, y1, 2 * step):
            draw.rectangle((x0, y, x1, min(y + step - 1, y1)), fill=colour)
    if kind == 2:
        for x in np.arange(x0, x1, 2 * step):
            draw.rectangle((x, y0, min(x + step - 1, x1), y1), fill=colour)
    if kind == 3:
        for row, y in enumerate(np.arange(y0, y1, step)):
            for x in np.arange(x0 + (row % 2) * step, x1, 2 * step):
                draw.rectangle((x, y, min(x + step - 1, x1), min(y + step - 1, y1)), fill=colour)
    if kind == 4:
        middle = (y0 + y1) / 2
        draw.rectangle((x0, middle - step, x1, middle + step), fill=colour)


def _person(look: dict[str, Any], size: int) -> Image.Image:
    w, h = size // 2, size
    image = Image.new("RGBA", (w, h))
    draw = ImageDraw.Draw(image)
    cx, half = w / 2, look["build"] * w / 2
    head = 0.065 * h * look["head"]
    neck, waist, knee, foot = 0.06 * h + 2 * head, 0.53 * h, 0.7 * h, 0.94 * h
    if look["hair_style"] == 1:  # long hair behind the shoulders
        draw.rectangle((cx - head, 0.06 * h + head, cx + head, neck + 0.08 * h), fill=look["hair"])
    if look["bag"] == 1:  # backpack peeking out on one side
        draw.rectangle((cx + half - 2, neck + 2, cx + half + 0.12 * w, waist - 4), fill=look["bag_colour"])
    legs = look["bottom"] if look["bottom_style"] != 1 else look["skin"]
    gap = max(1, w // 32)
    draw.rectangle((cx - half * 0.85, waist, cx - gap, foot), fill=legs)
    draw.rectangle((cx + gap, waist, cx + half * 0.85, foot), fill=legs)
    if look["bottom_style"] == 1:  # shorts
        draw.rectangle((cx - half * 0.85, waist, cx + half * 0.85, knee), fill=look["bottom"])
    if look["bottom_style"] == 2:  # skirt
        draw.polygon([(cx - half * 0.8, waist), (cx + half * 0.8, waist), (cx + half * 1.1, knee),
                      (cx - half * 1.1, knee)], fill=look["bottom"])
        draw.rectangle((cx - half * 0.6, knee, cx + half * 0.6, foot), fill=look["skin"])
    draw.rectangle((cx - half * 0.9, foot, cx - gap, h - 2), fill=look["shoes"])
    draw.rectangle((cx + gap, foot, cx + half * 0.9, h - 2), fill=look["shoes"])
    arm = 0.11 * w
    sleeve = waist if look["long_sleeves"] else neck + 0.35 * (waist - neck)
    for x0 in (cx - half - arm, cx + half):
        draw.rectangle((x0, neck + 2, x0 + arm, waist + 0.04 * h), fill=look["skin"])
        draw.rectangle((x0, neck + 2, x0 + arm, sleeve), fill=look["top"])
    torso = (cx - half, neck, cx + half, waist)
    draw.rectangle(torso, fill=look["top"])
    _pattern(draw, torso, look["pattern"], look["pattern_colour"], look["period"])
    if look["bag"] == 1:
        draw.line((cx + half * 0.5, neck, cx + half * 0.5, waist - 6), fill=look["bag_colour"], width=max(1, w // 20))
    if look["bag"] == 2:  # handbag at the hand
        draw.rectangle((cx - half - arm * 1.6, waist - 0.02 * h, cx - half + arm * 0.2, waist + 0.08 * h),
                       fill=look["bag_colour"])
    draw.ellipse((cx - head * 0.85, 0.06 * h, cx + head * 0.85, neck), fill=look["skin"])
    if look["hair_style"] in (0, 1):
        draw.chord((cx - head * 0.9, 0.05 * h, cx + head * 0.9, neck - head * 0.6), 180, 360, fill=look["hair"])
    if look["hair_style"] == 2:  # cap
        draw.chord((cx - head * 0.95, 0.045 * h, cx + head * 0.95, neck - head * 0.8), 180, 360, fill=look["bag_colour"])
        draw.rectangle((cx, 0.06 * h + head * 0.55, cx + head * 1.5, 0.06 * h + head * 0.75), fill=look["bag_colour"])
    return image


def _vehicle(look: dict[str, Any], size: int) -> Image.Image:
    w, h = size, int(size * 0.7)
    image = Image.new("RGBA", (w, h))
    draw = ImageDraw.Draw(image)
    kind, length = VEHICLE_TYPES[look["type"]], look["length"]
    x0, x1 = w * (1 - length) / 2 + 0.04 * w, w - w * (1 - length) / 2 - 0.04 * w
    ground, wheel = 0.88 * h, look["wheel"] * h
    bottom, top = ground - 0.6 * wheel, ground - wheel - 0.22 * h * look["height"]
    cabin = {"sedan": (0.3, 0.7, 0.2), "hatchback": (0.3, 0.92, 0.2), "suv": (0.15, 0.92, 0.26),
             "van": (0.04, 0.9, 0.34), "truck": (0.66, 0.94, 0.32)}[kind]
    span = x1 - x0
    cx0, cx1, roof = x0 + cabin[0] * span, x0 + cabin[1] * span, top - cabin[2] * h * look["height"]
    draw.polygon([(cx0, top), (cx0 + 0.08 * span, roof), (cx1 - 0.05 * span, roof), (cx1, top)], fill=look["roof"])
    inset = 0.03 * h
    draw.polygon([(cx0 + inset * 1.5, top - 1), (cx0 + 0.08 * span + inset, roof + inset),
                  (cx1 - 0.05 * span - inset, roof + inset), (cx1 - inset * 1.5, top - 1)], fill=look["window"])
    draw.line(((cx0 + cx1) / 2, roof, (cx0 + cx1) / 2, top), fill=look["roof"], width=max(1, w // 40))
    if kind == "truck":
        draw.rectangle((x0, roof, cx0 - 0.02 * span, bottom), fill=look["cargo"])
    draw.rectangle((x0, top, x1, bottom), fill=look["body"])
    if look["stripe"] is not None:
        middle = (top + bottom) / 2
        draw.rectangle((x0, middle - 0.02 * h, x1, middle + 0.02 * h), fill=look["stripe"])
    if look["rack"]:
        draw.rectangle((cx0 + 0.1 * span, roof - 0.03 * h, cx1 - 0.08 * span, roof - 0.01 * h), fill=(40, 40, 40))
    draw.rectangle((x1 - 0.03 * span, top + 0.02 * h, x1, top + 0.06 * h), fill=(250, 230, 140))  # front light
    draw.rectangle((x0, top + 0.02 * h, x0 + 0.03 * span, top + 0.06 * h), fill=(200, 30, 30))  # rear light
    for centre in (x0 + 0.2 * span, x1 - 0.2 * span):
        draw.ellipse((centre - wheel, ground - wheel, centre + wheel, ground + wheel), fill=(25, 25, 25))
        draw.ellipse((centre - wheel / 2, ground - wheel / 2, centre + wheel / 2, ground + wheel / 2), fill=look["rim"])
    return image


def _face(look: dict[str, Any], size: int) -> Image.Image:
    image = Image.new("RGBA", (size, size))
    draw = ImageDraw.Draw(image)
    cx, cy = size / 2, 0.55 * size
    rx, ry = look["width"] * size / 2, look["height"] * size / 2
    face = (cx - rx, cy - ry, cx + rx, cy + ry)
    if look["hair_style"] == 1:  # long hair behind the head
        draw.rectangle((cx - rx * 1.15, cy - ry * 0.6, cx + rx * 1.15, cy + ry * 0.7), fill=look["hair"])
        draw.ellipse((cx - rx * 1.15, cy - ry * 1.12, cx + rx * 1.15, cy + ry * 0.2), fill=look["hair"])
    for side in (-1, 1):  # ears
        draw.ellipse((cx + side * rx - rx * 0.12, cy - ry * 0.15, cx + side * rx + rx * 0.12, cy + ry * 0.15),
                     fill=look["skin"])
    draw.ellipse(face, fill=look["skin"])
    if look["beard"]:
        draw.chord(face, 20, 160, fill=look["hair"])
    style = look["hair_style"]
    if style in (0, 1, 3):
        draw.chord((cx - rx * 1.05, cy - ry * 1.08, cx + rx * 1.05, cy - ry * 0.1), 180, 360, fill=look["hair"])
    if style == 3:  # fringe
        draw.rectangle((cx - rx * 0.8, cy - ry * 0.62, cx + rx * 0.8, cy - ry * 0.48), fill=look["hair"])
    if style == 4:  # curls
        for angle in np.linspace(np.pi * 1.05, np.pi * 1.95, 7):
            x, y = cx + rx * np.cos(angle), cy - ry * 0.35 + ry * 0.75 * np.sin(angle)
            draw.ellipse((x - rx * 0.3, y - rx * 0.3, x + rx * 0.3, y + rx * 0.3), fill=look["hair"])
    eye_y, gap, eye = look["eye_y"] * size, look["eye_gap"] * size, look["eye_size"] * size
    for side in (-1, 1):
        ex = cx + side * gap / 2 * 1.2
        draw.ellipse((ex - eye * 1.4, eye_y - eye * 0.8, ex + eye * 1.4, eye_y + eye * 0.8), fill=(245, 245, 240))
        draw.ellipse((ex - eye * 0.7, eye_y - eye * 0.7, ex + eye * 0.7, eye_y + eye * 0.7), fill=look["eyes"])
        brow = tuple(int(c * 0.6) for c in look["hair"])
        draw.line((ex - eye * 1.5, eye_y - eye * 2, ex + eye * 1.5, eye_y - eye * 2.3 + side * 0.5), fill=brow,
                  width=look["brow"] * max(1, size // 64))
        if look["glasses"] is not None:
            draw.ellipse((ex - eye * 2.2, eye_y - eye * 1.8, ex + eye * 2.2, eye_y + eye * 1.8), outline=look["glasses"],
                         width=max(1, size // 48))
    nose = look["nose"] * size
    shade = tuple(int(c * 0.8) for c in look["skin"])
    draw.polygon([(cx, eye_y + eye), (cx - nose * 0.35, eye_y + nose + eye), (cx + nose * 0.35, eye_y + nose + eye)],
                 fill=shade)
    mouth_y, mw = eye_y + nose + eye + 0.08 * size, look["mouth"] * size
    if look["mouth_style"] == 0:
        draw.line((cx - mw / 2, mouth_y, cx + mw / 2, mouth_y), fill=look["lips"], width=max(1, size // 40))
    elif look["mouth_style"] == 1:  # smile
        draw.arc((cx - mw / 2, mouth_y - mw / 3, cx + mw / 2, mouth_y + mw / 5), 20, 160, fill=look["lips"],
                 width=max(1, size // 40))
    else:
        draw.ellipse((cx - mw / 2, mouth_y - mw / 6, cx + mw / 2, mouth_y + mw / 6), fill=look["lips"])
    return image


def _product(look: dict[str, Any], size: int) -> Image.Image:
    image = Image.new("RGBA", (size, size))
    draw = ImageDraw.Draw(image)
    name = PRODUCT_CLASSES[look["category"]]
    w, h = 0.42 * size * look["width"], 0.7 * size * look["height"]
    x0, y0, x1, y1 = size / 2 - w / 2, size / 2 - h / 2, size / 2 + w / 2, size / 2 + h / 2
    label = (x0, y0 + 0.45 * h, x1, y0 + 0.75 * h)
    if name == "bottle":
        draw.rectangle((size / 2 - w / 5, y0, size / 2 + w / 5, y0 + 0.3 * h), fill=look["body"])
        draw.rectangle((size / 2 - w / 4, y0 - 0.06 * h, size / 2 + w / 4, y0 + 0.04 * h), fill=look["accent"])
        draw.rounded_rectangle((x0, y0 + 0.25 * h, x1, y1), radius=w / 5, fill=look["body"])
    elif name == "box":
        depth = 0.15 * w
        draw.polygon([(x0, y0), (x0 + depth, y0 - depth), (x1 + depth, y0 - depth), (x1, y0)], fill=look["accent"])
        draw.polygon([(x1, y0), (x1 + depth, y0 - depth), (x1 + depth, y1 - depth), (x1, y1)],
                     fill=tuple(int(c * 0.7) for c in look["body"]))
        draw.rectangle((x0, y0, x1, y1), fill=look["body"])
        label = (x0 + 0.1 * w, y0 + 0.2 * h, x1 - 0.1 * w, y0 + 0.6 * h)
    elif name == "mug":
        x1m = x1 - 0.25 * w
        draw.ellipse((x1m - 0.15 * w, y0 + 0.5 * h - 0.2 * h, x1 + 0.05 * w, y0 + 0.5 * h + 0.2 * h),
                     outline=look["accent"], width=max(2, size // 20))
        draw.rectangle((x0, y0 + 0.3 * h, x1m, y1), fill=look["body"])
        label = (x0, y0 + 0.5 * h, x1m, y0 + 0.75 * h)
    elif name == "can":
        draw.rectangle((x0, y0, x1, y1), fill=look["body"])
        draw.ellipse((x0, y0 - 0.05 * h, x1, y0 + 0.05 * h), fill=look["accent"])
        label = (x0, y0 + 0.15 * h, x1, y1 - 0.1 * h)
    elif name == "lamp":
        draw.ellipse((x0, y1 - 0.08 * h, x1, y1), fill=look["accent"])
        draw.rectangle((size / 2 - 0.04 * w, y0 + 0.35 * h, size / 2 + 0.04 * w, y1 - 0.04 * h), fill=look["accent"])
        draw.polygon([(x0 + 0.15 * w, y0), (x1 - 0.15 * w, y0), (x1 + 0.1 * w, y0 + 0.4 * h),
                      (x0 - 0.1 * w, y0 + 0.4 * h)], fill=look["body"])
        label = (x0 + 0.05 * w, y0 + 0.15 * h, x1 - 0.05 * w, y0 + 0.32 * h)
    else:  # chair
        draw.rectangle((x0, y0, x0 + 0.15 * w, y1), fill=look["accent"])
        draw.rectangle((x1 - 0.15 * w, y0 + 0.5 * h, x1, y1), fill=look["accent"])
        draw.rectangle((x0, y0 + 0.5 * h, x1, y0 + 0.6 * h), fill=look["body"])
        draw.rectangle((x0, y0, x0 + 0.6 * w, y0 + 0.45 * h), fill=look["body"])
        label = (x0 + 0.05 * w, y0 + 0.08 * h, x0 + 0.55 * w, y0 + 0.38 * h)
    draw.rectangle(label, fill=look["label"])
    pattern = (1, 2, 3, 4)[look["label_pattern"]]
    _pattern(draw, label, pattern, look["ink"], look["period"])
    return image


_DRAW = {"person": _person, "vehicle": _vehicle, "face": _face, "product": _product}


@lru_cache(maxsize=2048)
def _template(kind: str, identity: int, size: int, seed: int) -> Image.Image:
    return _DRAW[kind](_look(kind, identity, seed), size)


# ---- cameras and views ------------------------------------------------------------------------------

def _camera_look(kind: str, camera: int, seed: int) -> dict[str, Any]:
    """What a camera adds to every image it takes: background colours, clutter, illumination tint."""
    rng = _rng(seed, kind, "camera", camera)
    bright = kind == "product"  # catalogue photos: light, plain backgrounds
    value = (0.75, 1.0) if bright else (0.2, 0.8)
    return dict(top=_colour(rng, (0.0, 0.35), value), bottom=_colour(rng, (0.0, 0.35), value),
                clutter=0 if bright or kind == "face" else int(rng.integers(2, 6)),
                clutter_colours=[_colour(rng, (0.0, 0.6), (0.2, 0.9)) for _ in range(3)],
                tint=rng.uniform(0.85, 1.15, 3), brightness=float(rng.uniform(0.8, 1.15)))


def _background(look: dict[str, Any], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    ramp = np.linspace(0.0, 1.0, h)[:, None, None]  # (H, 1, 1)
    pixels = (1 - ramp) * np.asarray(look["top"]) + ramp * np.asarray(look["bottom"])  # (H, 1, 3)
    pixels = np.broadcast_to(pixels, (h, w, 3)) + rng.normal(0, 4, (h, w, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(look["clutter"]):
        x, y = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        colour = look["clutter_colours"][rng.integers(len(look["clutter_colours"]))]
        draw.rectangle((x, y, x + rng.uniform(0.1, 0.5) * w, y + rng.uniform(0.1, 0.5) * h), fill=colour)
    return image


_VIEW_RANGES = {  # rotation (degrees), scale, log-aspect, shift (fraction of the side)
    "person": (6.0, (0.82, 1.05), 0.12, 0.08),
    "vehicle": (5.0, (0.75, 1.05), 0.15, 0.08),
    "face": (10.0, (0.85, 1.1), 0.08, 0.06),
    "product": (15.0, (0.7, 1.05), 0.15, 0.1),
}


def _place(obj: Image.Image, background: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """Flip, rotate, rescale (with an aspect change) and paste the object at a shifted position."""
    rotation, scale, aspect, shift = _VIEW_RANGES[kind]
    if rng.random() < 0.5:
        obj = ImageOps.mirror(obj)
    obj = obj.rotate(rng.uniform(-rotation, rotation), resample=Image.BILINEAR, expand=True)
    factor, stretch = rng.uniform(*scale), float(np.exp(rng.uniform(-aspect, aspect)))
    obj = obj.resize((max(1, round(obj.width * factor * stretch)), max(1, round(obj.height * factor / stretch))),
                     Image.BILINEAR)
    w, h = background.size
    x = (w - obj.width) / 2 + rng.uniform(-shift, shift) * w
    y = (h - obj.height) / 2 + rng.uniform(-shift, shift) * h
    background.paste(obj, (int(round(x)), int(round(y))), obj)
    return background


def _photometric(image: Image.Image, look: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """The camera's tint and brightness, per-image brightness / contrast / colour jitter and noise."""
    pixels = np.asarray(image, dtype=np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.8, 1.2) + mean
    gain = look["tint"] * look["brightness"] * rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)
    pixels = pixels * gain + rng.normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render_view(task: str, identity: int, view: int, camera: int, size: int = DEFAULT_SIZE,
                seed: int = 0) -> Image.Image:
    """RGB image number `view` of `identity`, taken by `camera` (a pure function of its arguments).

    Canvas: person size/2 x size (Market-1501's 1:2), vehicle size x 0.7 size, face and product
    size x size."""
    kind = _kind(task)
    rng = _rng(seed, kind, "view", identity, view)
    template = _template(kind, identity, size, seed)
    look = _camera_look(kind, camera, seed)
    image = _place(template, _background(look, template.size, rng), kind, rng)
    return _photometric(image, look, rng)


def _cameras(kind: str, identity: int, seed: int, count: int) -> list[int]:
    """`count` distinct camera ids (from 1) that see `identity`, in a fixed random order."""
    rng = _rng(seed, kind, "cameras", identity)
    return [int(c) + 1 for c in rng.choice(CAMERAS[kind], size=min(count, CAMERAS[kind]), replace=False)]


# ---- datasets -----------------------------------------------------------------------------------------

def _meta(task: str, identity: int, camera: int, split: str) -> dict[str, Any]:
    kind = _kind(task)
    meta: dict[str, Any] = {"dataset": f"demo_{kind}", "identity": identity}
    if kind in ("person", "vehicle"):
        meta.update(camera=camera, split=split)
    if kind == "product":
        meta.update(super_class=appearance(task, identity)["category"], split=split)
    return meta


class DemoIdentities(Sequence):
    """Training images of `num_identities` identities (numbered 1...), `views` images each, rendered
    when indexed (nothing is held in memory). Item i is view ``i % views`` of identity ``i // views + 1``;
    each identity is seen by 2 to 4 of the kind's cameras.

    `identities` lists ``(dataset, identity)`` per item without rendering (what
    ``ofa_ufo.tasks.embedding.identities_of`` reads for P x K sampling and the CosFace classes)."""

    def __init__(self, task: str, split: str = "train", num_identities: int = 1000, views: int = TRAIN_VIEWS,
                 size: int = DEFAULT_SIZE, seed: int = 0) -> None:
        if num_identities < 0 or views < 1 or seed < 0:
            raise ValueError(f"num_identities >= 0, views >= 1 and seed >= 0 needed, got {num_identities}, {views}, "
                             f"{seed}")
        self.task, self.kind, self.split = task, _kind(task), split
        self.num_identities, self.views, self.size, self.seed = num_identities, views, size, seed

    def __len__(self) -> int:
        return self.num_identities * self.views

    @property
    def identities(self) -> list[Hashable]:
        dataset = f"demo_{self.kind}"
        return [(dataset, i // self.views + 1) for i in range(len(self))]

    def camera(self, index: int) -> int:
        identity, view = divmod(index, self.views)
        cameras = _cameras(self.kind, identity + 1, self.seed, 2 + (identity + 1) % 3)
        return cameras[view % len(cameras)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} demo images")
        index %= len(self)
        identity, view = index // self.views + 1, index % self.views
        camera = self.camera(index)
        image = render_view(self.task, identity, view, camera, self.size, self.seed)
        return new_example(id=f"{self.split}/{identity:04d}_c{camera}_{view}", task=self.task, image=image,
                           meta=_meta(self.task, identity, camera, self.split))


def _reid_held_out(task: str, count: int, size: int, seed: int) -> list[dict[str, Any]]:
    """Market-1501 protocol: per identity one query and a gallery of the same identity seen by the query's
    camera (dropped by the metric) and by other cameras; 5 images per identity (2 when count < 10)."""
    per = 5 if count >= 10 else 2
    examples = []
    for i in range(count // per):
        identity = HELD_OUT_OFFSET + i + 1
        picks = _cameras(_kind(task), identity, seed, 4)
        cameras = [picks[0], picks[0], *picks[1:4]] if per == 5 else picks[:2]
        for view, camera in enumerate(cameras):
            split = "query" if view == 0 else "gallery"
            image = render_view(task, identity, view, camera, size, seed)
            examples.append(new_example(id=f"{split}/{identity}_c{camera}_{view}", task=task, image=image,
                                        meta=_meta(task, identity, camera, split)))
    return examples


def _face_pairs(task: str, count: int, size: int, seed: int) -> list[dict[str, Any]]:
    """LFW-style pairs, same and different alternating (balanced), in 10 folds (2 below 20 pairs)."""
    pairs = count // 2
    if pairs < 2:
        return []
    folds = 10 if pairs >= 20 else 2
    examples = []
    for pair in range(pairs):
        same, first = pair % 2 == 0, HELD_OUT_OFFSET + 2 * pair + 1
        members = [(first, 0), (first, 1)] if same else [(first, 0), (first + 1, 0)]
        for side, (identity, view) in enumerate(members):
            camera = int(_rng(seed, "face", "pair", pair, side).integers(CAMERAS["face"])) + 1
            meta = {**_meta(task, identity, camera, "test"), "pair": pair, "side": side, "same": same,
                    "fold": pair * folds // pairs}
            examples.append(new_example(id=f"pair{pair}/{side}", task=task,
                                        image=render_view(task, identity, view, camera, size, seed), meta=meta))
    return examples


def _product_held_out(task: str, count: int, size: int, seed: int) -> list[dict[str, Any]]:
    """SOP-style: 4 images per product (2 when count < 8); every image queries all the others."""
    per = 4 if count >= 8 else 2
    examples = []
    for i in range(count // per):
        identity = HELD_OUT_OFFSET + i + 1
        for view in range(per):
            camera = int(_rng(seed, "product", "camera", identity, view).integers(CAMERAS["product"])) + 1
            meta = {**_meta(task, identity, camera, "test"), "image_id": len(examples) + 1}
            examples.append(new_example(id=str(len(examples) + 1), task=task, meta=meta,
                                        image=render_view(task, identity, view, camera, size, seed)))
    return examples


_HELD_OUT = {"person": _reid_held_out, "vehicle": _reid_held_out, "face": _face_pairs, "product": _product_held_out}


def held_out_examples(task: str, count: int, size: int = DEFAULT_SIZE, seed: int = 0) -> list[dict[str, Any]]:
    """At most `count` evaluation images of identities never used in training, laid out for the task's
    metric: ReID query / gallery with camera ids (``reid``), face pairs (``verification``), product
    groups (``recall@k``). Deterministic in its arguments."""
    return _HELD_OUT[_kind(task)](task, max(0, count), size, seed)
