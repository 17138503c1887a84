"""Checks that the demo scenes are deterministic and that every label tells the truth."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ofa_ufo.data.demo_scenes import (
    BACKGROUNDS,
    COLORS,
    GAP,
    MAX_SIDE,
    MIN_SIDE,
    NUMBER_WORDS,
    POSITION_WORDS,
    SHAPES,
    TASKS,
    DemoScenes,
    Scene,
    SceneObject,
    caption_example,
    class_names,
    classification_example,
    detection_example,
    detection_labels,
    generate_scene,
    grounding_example,
    make_examples,
    referring_expression,
    vqa_example,
)

SIZE = 128


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [DemoScenes("train", 40, size=SIZE, seed=1)[i] for i in range(40)]


def _same(a: Scene, b: Scene) -> bool:
    return a.objects == b.objects and np.array_equal(np.asarray(a.image), np.asarray(b.image))


def _resolve(scene: Scene, text: str) -> list[SceneObject]:
    """Objects a referring expression can denote, read the way a person would."""
    words = text.split()
    assert words[0] == "the"
    name = " ".join(words[-2:])
    twins = [o for o in scene.objects if o.name == name]
    if len(words) == 3:
        return twins
    return [twins[POSITION_WORDS[len(twins)].index(words[1])]] if len(twins) > 1 else []


def _scene(*objects: tuple[str, str, tuple[float, float, float, float]]) -> Scene:
    image = Image.new("RGB", (SIZE, SIZE))
    return Scene(image, [SceneObject(s, c, b) for s, c, b in objects], "gray")


def test_tables_are_distinct_and_consistent() -> None:
    assert len(SHAPES) >= 5 and 6 <= len(COLORS) <= 8
    assert class_names() == sorted(SHAPES)
    assert len(set(detection_labels())) == len(COLORS) * len(SHAPES)
    for bg, obj in itertools.product(BACKGROUNDS.values(), COLORS.values()):
        assert np.linalg.norm(np.subtract(bg, obj)) > 80


def test_same_seed_split_index_regenerates_identically() -> None:
    a, b = DemoScenes("train", 5, size=SIZE, seed=7), DemoScenes("train", 5, size=SIZE, seed=7)
    for i in (4, 0, 2):
        assert _same(a[i], b[i])
    assert _same(a[-1], a[4])


def test_splits_and_seeds_differ() -> None:
    train, val = DemoScenes("train", 5, size=SIZE), DemoScenes("val", 5, size=SIZE)
    other = DemoScenes("train", 5, size=SIZE, seed=1)
    for i in range(5):
        assert not _same(train[i], val[i]) and not _same(train[i], other[i])


def test_dataset_length_and_bounds() -> None:
    ds = DemoScenes("val", 3, size=SIZE)
    assert len(ds) == 3 and len(list(ds)) == 3
    with pytest.raises(IndexError):
        ds[3]


def test_boxes_are_inside_image_and_tight(scenes: list[Scene]) -> None:
    for scene in scenes[:15]:
        pixels = np.asarray(scene.image)
        for obj in scene.objects:
            x0, y0, x1, y1 = (int(v) for v in obj.box)
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            lo_x, lo_y = max(x0 - GAP + 1, 0), max(y0 - GAP + 1, 0)
            window = pixels[lo_y : y1 + GAP - 1, lo_x : x1 + GAP - 1]
            ys, xs = np.nonzero((window == COLORS[obj.color]).all(-1))
            drawn = (xs.min() + lo_x, ys.min() + lo_y, xs.max() + lo_x + 1, ys.max() + lo_y + 1)
            assert np.abs(np.subtract(drawn, obj.box)).max() <= 2, (obj, drawn)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), max_objects=st.integers(1, 4))
def test_scene_invariants(seed: int, max_objects: int) -> None:
    scene = generate_scene(np.random.default_rng(seed), size=96, max_objects=max_objects)
    assert scene.image.size == (96, 96) and scene.background in BACKGROUNDS
    assert 1 <= len(scene.objects) <= max_objects
    for a, b in itertools.combinations(scene.objects, 2):
        ix = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
        iy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
        assert ix <= 0 or iy <= 0
    for o in scene.objects:
        assert o.shape in SHAPES and o.color in COLORS
        assert round(MIN_SIDE * 96) <= o.box[2] - o.box[0] <= round(MAX_SIDE * 96)
    centres = [o.box[0] + o.box[2] for o in scene.objects]
    assert centres == sorted(centres)


def test_object_counts_cover_the_range(scenes: list[Scene]) -> None:
    assert {len(s.objects) for s in scenes} == {1, 2, 3}


def test_caption_lists_objects_left_to_right() -> None:
    boxes = [(0, 0, 20, 20), (30, 0, 50, 20), (60, 0, 80, 20)]
    scene = _scene(("circle", "red", boxes[0]), ("star", "green", boxes[2]))
    assert caption_example(scene)["target"] == "a red circle and a green star"
    scene = _scene(
        ("circle", "red", boxes[0]), ("square", "orange", boxes[1]), ("star", "green", boxes[2])
    )
    assert caption_example(scene)["target"] == "a red circle, an orange square and a green star"
    assert caption_example(_scene(("circle", "red", boxes[0])))["target"] == "a red circle"


def test_caption_matches_generated_objects(scenes: list[Scene]) -> None:
    for scene in scenes:
        target = caption_example(scene)["target"]
        positions = [target.index(o.name) for o in scene.objects]
        assert positions == sorted(positions) and target.count(" and ") == (len(scene.objects) > 1)


def _check_answer(scene: Scene, question: str, answer: str) -> None:
    pairs = {(o.color, o.shape) for o in scene.objects}
    words = question.rstrip("?").split()
    if question.startswith("how many"):
        assert answer == NUMBER_WORDS[len(scene.objects)]
    elif question.startswith("is there"):
        assert answer == ("yes" if (words[3], words[4]) in pairs else "no")
    elif question.startswith("what color"):
        assert [o.color for o in scene.objects if o.shape == words[-1]] == [answer]
    else:
        assert [o.shape for o in scene.objects if o.color == words[-2]] == [answer]


def test_vqa_answers_are_correct_and_balanced(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(0)
    kinds, yes_no = set(), []
    for scene, _ in itertools.product(scenes, range(10)):
        ex = vqa_example(scene, rng)
        _check_answer(scene, ex["text"], ex["target"])
        kinds.add(" ".join(ex["text"].split()[:2]))
        yes_no += [ex["target"]] if ex["target"] in ("yes", "no") else []
    assert kinds == {"how many", "is there", "what color", "what shape"}
    assert 0.4 < yes_no.count("yes") / len(yes_no) < 0.6


def test_grounding_text_identifies_exactly_one_object(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(0)
    for scene in scenes:
        ex = grounding_example(scene, rng)
        assert [o.box for o in _resolve(scene, ex["text"])] == [ex["box"]]


def test_grounding_uses_position_words_for_identical_objects() -> None:
    scene = _scene(("circle", "red", (0, 0, 20, 20)), ("circle", "red", (40, 50, 60, 70)),
                   ("star", "blue", (40, 0, 60, 20)), ("circle", "red", (90, 0, 110, 20)))
    texts = [referring_expression(scene, i) for i in range(4)]
    assert texts == ["the left red circle", "the middle red circle", "the blue star",
                     "the right red circle"]


def test_detection_and_classification_examples(scenes: list[Scene]) -> None:
    for scene in scenes:
        det = detection_example(scene)
        assert det["labels"] == [o.name for o in scene.objects]
        assert det["boxes"] == [o.box for o in scene.objects]
        assert set(det["labels"]) <= set(detection_labels())
        largest = max(o.box[2] - o.box[0] for o in scene.objects)
        label = classification_example(scene)["target"]
        assert label in {o.shape for o in scene.objects if o.box[2] - o.box[0] == largest}


def test_make_examples_covers_every_task(scenes: list[Scene]) -> None:
    ds = DemoScenes("train", 2, size=SIZE)
    examples = make_examples(ds[0], ds.example_rng(0))
    assert [e["task"] for e in examples] == list(TASKS)
    assert all(e["image"] is examples[0]["image"] for e in examples)
    assert make_examples(ds[0], ds.example_rng(0)) == make_examples(ds[0], ds.example_rng(0))
    with pytest.raises(KeyError):
        make_examples(scenes[0], np.random.default_rng(0), tasks=("caption", "nope"))
