"""Checks the hand-written real-photo labels: complete, inside each image, canonical."""

from __future__ import annotations

import sys

import pytest

from ofa_ufo.data.real_photos import load_photo, load_real_photos, photo_labels, real_photo_examples

FIELDS = {"source", "size", "caption", "qa", "objects", "class"}


def test_every_photo_has_every_field() -> None:
    labels = photo_labels()
    assert len(labels) >= 8
    for name, photo in labels.items():
        assert set(photo) == FIELDS, name
        assert photo["source"]["package"] == "scikit-image" and photo["source"]["loader"]
        assert photo["caption"].strip() and photo["class"].strip()
        assert 2 <= len(photo["qa"]) <= 3 and all(qa["question"] and qa["answer"] for qa in photo["qa"])
        assert 1 <= len(photo["objects"]) <= 3 and all(o["label"] for o in photo["objects"])


def test_boxes_lie_inside_their_labelled_size() -> None:
    for name, photo in photo_labels().items():
        width, height = photo["size"]
        for obj in photo["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (name, obj)


def test_photos_load_at_their_labelled_size() -> None:
    pytest.importorskip("skimage")
    for name, photo in photo_labels().items():
        image = load_photo(name)
        assert image.mode == "RGB" and list(image.size) == photo["size"]


def test_examples_are_valid_canonical_records() -> None:
    pytest.importorskip("skimage")
    examples = load_real_photos()
    assert len({e["id"] for e in examples}) == len(examples)
    tasks = {e["task"] for e in examples}
    assert tasks == {"caption", "vqa", "grounding", "detection", "classification"}
    for example in examples:
        if example["task"] == "grounding":
            assert example["boxes"] == [example["box"]]
    assert {e["meta"]["photo"] for e in examples} == set(photo_labels())
    assert all(e["task"] == "detection" for e in real_photo_examples("detection"))
    with pytest.raises(ValueError):
        real_photo_examples("nope")


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match=r"ofa-ufo\[demo\]"):
        load_photo("astronaut")
