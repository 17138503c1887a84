"""One example per task from a demo scene (:mod:`ofa_ufo.data.demo_scenes`).

Every fact about a scene is known exactly, so each builder writes a label that tells the
truth: captions, questions and answers, referring expressions and their boxes, hypotheses,
matching and altered captions. Examples are plain dicts holding only the canonical fields
they need (see `ofa_ufo.data.canonical`; `new_example(id=..., **example)` fills in the rest);
turning them into prompts is the task layer's job.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ofa_ufo.data.demo_scenes import COLORS, NUMBER_WORDS, POSITION_WORDS, SHAPES, DemoScenes, Scene, SceneObject
from ofa_ufo.tasks import list_tasks

VQA_TEMPLATES: dict[str, str] = {
    "color": "what color is the {shape}?",
    "shape": "what shape is the {color} object?",
    "count": "how many objects are there?",
    "exists": "is there {article} {color} {shape}?",
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(obj: SceneObject) -> str:
    return f"{_article(obj.color)} {obj.name}"


def caption_example(scene: Scene, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """The canonical caption: objects left to right, "a x, a y and a z".

    `rng` is accepted only so every rng-taking builder shares one signature; captions are
    deterministic so a tiny model sees one target per image.
    """
    return {"task": "caption", "image": scene.image, "target": _describe(scene.objects)}


def _describe(objects: Sequence[SceneObject]) -> str:
    """ "a x, a y and a z" for the objects in the order given."""
    phrases = [_with_article(o) for o in objects]
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def _unique(values: list[str]) -> list[str]:
    counts = Counter(values)
    return [v for v in values if counts[v] == 1]


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _color_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    shape = _pick(rng, _unique([o.shape for o in scene.objects]))
    color = next(o.color for o in scene.objects if o.shape == shape)
    return VQA_TEMPLATES["color"].format(shape=shape), color


def _shape_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    color = _pick(rng, _unique([o.color for o in scene.objects]))
    shape = next(o.shape for o in scene.objects if o.color == color)
    return VQA_TEMPLATES["shape"].format(color=color), shape


def _count_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    return VQA_TEMPLATES["count"], NUMBER_WORDS[len(scene.objects)]


def _exists_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """Half the time ask about a present object, else about an absent colour-shape pair."""
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = _pick(rng, sorted(present))
        answer = "yes"
    else:
        color, shape = _pick(rng, _absent_pairs(scene))
        answer = "no"
    question = VQA_TEMPLATES["exists"].format(article=_article(color), color=color, shape=shape)
    return question, answer


_QUESTIONS: dict[str, Callable[[Scene, np.random.Generator], tuple[str, str]]] = {
    "color": _color_question,
    "shape": _shape_question,
    "count": _count_question,
    "exists": _exists_question,
}


def _question_kinds(scene: Scene) -> list[str]:
    """Templates answerable without ambiguity in this scene."""
    kinds = ["count", "exists"]
    if _unique([o.shape for o in scene.objects]):
        kinds.append("color")
    if _unique([o.color for o in scene.objects]):
        kinds.append("shape")
    return kinds


def vqa_example(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """A random answerable question with a one-word answer."""
    question, answer = _QUESTIONS[_pick(rng, _question_kinds(scene))](scene, rng)
    return {"task": "vqa", "image": scene.image, "text": question, "target": answer}


def referring_expression(scene: Scene, index: int) -> str:
    """ "the red circle", or "the left red circle" when identical objects share the scene."""
    obj = scene.objects[index]
    twins = [i for i, o in enumerate(scene.objects) if o.name == obj.name]
    if len(twins) == 1:
        return f"the {obj.name}"
    return f"the {POSITION_WORDS[len(twins)][twins.index(index)]} {obj.name}"


def grounding_example(
    scene: Scene, rng: np.random.Generator, multi_prob: float = 0.0, none_prob: float = 0.0
) -> dict[str, Any]:
    """A referring expression and every box it denotes, left to right.

    With probability `none_prob` it names an absent colour-shape pair (`boxes` = []), with
    `multi_prob` a group of 2+ objects ("the red shapes", "the circles"; `boxes` = all of
    them), else one object (`box`). The defaults (0, 0) keep the single-object examples and
    draw nothing extra from `rng`; a scene without a group falls back to one object.
    """
    if not (0 <= multi_prob and 0 <= none_prob and multi_prob + none_prob <= 1):
        raise ValueError(f"multi_prob and none_prob must be >= 0 and sum to <= 1, got {multi_prob}, {none_prob}")
    draw = rng.random() if multi_prob or none_prob else 1.0
    groups = _groups(scene)
    if draw < none_prob:
        text, boxes = _absent_expression(scene, rng), []
    elif draw < none_prob + multi_prob and groups:
        text, members = _pick(rng, groups)
        boxes = [o.box for o in members]
    else:
        index = int(rng.integers(len(scene.objects)))
        text, box = referring_expression(scene, index), scene.objects[index].box
        return {"task": "grounding", "image": scene.image, "text": text, "box": box}
    return {"task": "grounding", "image": scene.image, "text": text, "boxes": boxes}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _groups(scene: Scene) -> list[tuple[str, list[SceneObject]]]:
    """Plural expressions that denote 2+ objects of the scene, with their objects."""
    candidates = [("the shapes", lambda o: True)]
    candidates += [(f"the {c} shapes", lambda o, c=c: o.color == c) for c in COLORS]
    candidates += [(f"the {_plural(s)}", lambda o, s=s: o.shape == s) for s in SHAPES]
    candidates += [(f"the {c} {_plural(s)}", lambda o, c=c, s=s: o.name == f"{c} {s}")
                   for c in COLORS for s in SHAPES]
    groups = [(text, [o for o in scene.objects if match(o)]) for text, match in candidates]
    return [(text, members) for text, members in groups if len(members) > 1]


def _absent_pairs(scene: Scene) -> list[tuple[str, str]]:
    present = {(o.color, o.shape) for o in scene.objects}
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]


def _absent_expression(scene: Scene, rng: np.random.Generator) -> str:
    color, shape = _pick(rng, _absent_pairs(scene))
    return f"the {color} {shape}"


def detection_example(scene: Scene) -> dict[str, Any]:
    """All objects, left to right, labelled "colour shape"."""
    return {
        "task": "detection",
        "image": scene.image,
        "boxes": [o.box for o in scene.objects],
        "labels": [o.name for o in scene.objects],
    }


def classification_example(scene: Scene) -> dict[str, Any]:
    """The image's class is the shape of its largest object (leftmost wins a tie)."""
    largest = max(scene.objects, key=lambda o: o.area)
    return {"task": "classification", "image": scene.image, "target": largest.shape}


# Properties a flat drawing cannot show, so hypotheses about them are neutral.
UNKNOWABLE: tuple[str, ...] = (
    "heavy", "light", "made of wood", "made of metal", "hot", "cold", "expensive", "soft",
)


def _count_statement(count: int) -> str:
    noun = "shape" if count == 1 else "shapes"
    verb = "is" if count == 1 else "are"
    return f"there {verb} {NUMBER_WORDS[count]} {noun}"


def _entailed(scene: Scene, rng: np.random.Generator) -> str:
    """A statement the image shows to be true."""
    if rng.random() < 0.5:
        return _count_statement(len(scene.objects))
    return f"there is {_with_article(_pick(rng, scene.objects))}"


def _contradicted(scene: Scene, rng: np.random.Generator) -> str:
    """A statement the image shows to be false."""
    if rng.random() < 0.5:
        wrong = [n for n in range(1, len(NUMBER_WORDS)) if n != len(scene.objects)]
        return _count_statement(_pick(rng, wrong))
    color, shape = _pick(rng, _absent_pairs(scene))
    return f"there is {_article(color)} {color} {shape}"


def _unknowable(scene: Scene, rng: np.random.Generator) -> str:
    """A statement about a visible object that no image could settle."""
    subject = referring_expression(scene, int(rng.integers(len(scene.objects))))
    return f"{subject} is {_pick(rng, UNKNOWABLE)}"


_HYPOTHESES: dict[str, Callable[[Scene, np.random.Generator], str]] = {
    "entailment": _entailed,
    "contradiction": _contradicted,
    "neutral": _unknowable,
}


def entailment_example(
    scene: Scene, rng: np.random.Generator, with_premise: bool = True
) -> dict[str, Any]:
    """A hypothesis and its label, the three labels equally likely (SNLI-VE style).

    Entailment: a true count or a present object; contradiction: a wrong count or an
    absent colour-shape pair; neutral: a visible object with a property pictures cannot
    show ("the red circle is heavy"). The premise, when given, is the caption.
    """
    label = _pick(rng, list(_HYPOTHESES))
    example = {"task": "entailment", "image": scene.image, "text": _HYPOTHESES[label](scene, rng),
               "target": label}
    if with_premise:
        example["premise"] = caption_example(scene)["target"]
    return example


def _corrupted(obj: SceneObject, rng: np.random.Generator) -> SceneObject:
    """The object with its colour or its shape swapped for a different one."""
    if rng.random() < 0.5:
        return SceneObject(obj.shape, _pick(rng, [c for c in COLORS if c != obj.color]), obj.box)
    return SceneObject(_pick(rng, [s for s in SHAPES if s != obj.shape]), obj.color, obj.box)


def itm_example(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """The true caption ("yes") or, equally often, one with a single object altered ("no").

    Altering one object changes the multiset of objects named, so a "no" caption is
    always false of the scene.
    """
    objects = list(scene.objects)
    if rng.random() < 0.5:
        return {"task": "itm", "image": scene.image, "text": _describe(objects), "target": "yes"}
    index = int(rng.integers(len(objects)))
    objects[index] = _corrupted(objects[index], rng)
    return {"task": "itm", "image": scene.image, "text": _describe(objects), "target": "no"}


def grounded_caption_example(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """One object's box and its description, e.g. "a red circle"."""
    obj = _pick(rng, scene.objects)
    return {"task": "grounded_caption", "image": scene.image, "box": obj.box,
            "target": _with_article(obj)}


_BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "caption": caption_example,
    "vqa": vqa_example,
    "grounding": grounding_example,
    "detection": lambda scene, rng: detection_example(scene),
    "classification": lambda scene, rng: classification_example(scene),
    "entailment": entailment_example,
    "itm": itm_example,
    "grounded_caption": grounded_caption_example,
}
# Tasks `make_examples` makes only on request. Image generation: the scene is the target (text_to_image:
# from its caption).
_IMAGE_TARGET_BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "text_to_image": lambda scene, rng: {"task": "text_to_image", "image": scene.image,
                                         "text": _describe(scene.objects)},
    "image_infill": lambda scene, rng: {"task": "image_infill", "image": scene.image},
    # the dense head's detection: the same boxes and labels as detection (not a default task: it needs a dense head)
    "dense_detection": lambda scene, rng: {**detection_example(scene), "task": "dense_detection"},
}
# The tasks a scene answers about itself (every one `make_examples` makes by default), in registry order.
TASKS: tuple[str, ...] = tuple(task for task in list_tasks() if task in _BUILDERS)


def make_examples(
    scene: Scene,
    rng: np.random.Generator,
    tasks: Sequence[str] = TASKS,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One example per requested task, in the order given, all drawn from `rng`.

    `options` maps a task to keyword arguments for its builder, e.g.
    ``{"grounding": {"multi_prob": 0.3, "none_prob": 0.1}}`` (see :func:`grounding_example`).
    """
    builders = {**_BUILDERS, **_IMAGE_TARGET_BUILDERS}
    options = options or {}
    unknown = list(dict.fromkeys(t for t in (*tasks, *options) if t not in builders))
    if unknown:
        raise KeyError(f"unknown demo tasks {unknown}; known: {list(builders)}")
    return [builders[t](scene, rng, **options.get(t, {})) for t in tasks]


def check_demo_options(options: Mapping[str, Mapping[str, Any]]) -> None:
    """ValueError naming the task and the problem when `options` (as `make_examples` takes them) names a
    task scenes make no examples of, a keyword its builder does not take, or a value it refuses; tried
    on one generated scene, so a training config fails when it is read rather than at its first draw."""
    if not options:
        return
    builders = {**_BUILDERS, **_IMAGE_TARGET_BUILDERS}
    scene, rng = DemoScenes("check", 1)[0], np.random.default_rng(0)
    for task, kwargs in options.items():
        if task not in builders:
            raise ValueError(f"no demo examples for task {task!r}; tasks with demo examples: {list(builders)}")
        accepted = list(inspect.signature(builders[task]).parameters)[2:]  # after (scene, rng)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"task {task!r}: unknown demo option(s) {unknown}; its demo examples take "
                             f"{accepted or 'no options'}")
        try:
            make_examples(scene, rng, (task,), {task: kwargs})
        except (TypeError, ValueError) as error:
            raise ValueError(f"task {task!r}: {error}") from None
