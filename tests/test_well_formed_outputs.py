"""Well-formed outputs whatever the weights: every registered task, and the free prompt, through the
pipeline on random tiny models whose image-code and location-bin logits carry boosted random biases
(what a badly trained model does: bins inside a caption, every box on the image corner), on random
images of random sizes. Text holds no `<bin_N>` / `<code_N>` / special token; boxes lie inside the
image with positive area; detection keeps no same-label pair above its NMS IoU; closed-set tasks answer
with one of their candidates; embeddings are unit vectors; generated images have the asked size."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import ofa_ufo
from ofa_ufo.hf.pipeline import OFAUFOPipeline
from ofa_ufo.metrics.grounding import box_iou
from ofa_ufo.tasks import get_task

SPECIAL = re.compile(r"<bin_\d+>|<code_\d+>|<mask>|<s>|</s>|<pad>|<unk>")
WORDS = ["the red circle", "a blue square", "what color is it", "two shapes", "the left green star", "is it"]
LABELS = ["circle", "Square", "red star", "blue triangle", "dog"]
VQGAN = ofa_ufo.create_vqgan("vqgan_tiny").eval()
# Bias profiles (seed, how): "corner" every code and bin raised by U(0, 20) and the last bin by 40 more
# (the tiny demo's detector answered [W, H, W, H] points); "bins" the U(0, 20) raise alone; "noise"
# N(0, 8) over the whole vocabulary. Hypothesis's first example of each test draws the first profile.
PROFILES = [(1, "corner"), (0, "bins"), (2, "noise")]
SETTINGS = settings(max_examples=3, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _boosted(seed: int, how: str):
    """A tiny random model whose output logits get a fixed random bias per vocabulary id."""
    model = tiny_model(seed)
    config, generator = model.config, torch.Generator().manual_seed(seed)
    bias = torch.zeros(config.vocab_size)
    start, end = config.code_offset, config.bin_offset + config.num_bins  # codes, then bins
    if how == "noise":
        bias = torch.randn(config.vocab_size, generator=generator) * 8
    else:
        bias[start:end] = torch.rand(end - start, generator=generator) * 20
    if how == "corner":
        bias[end - 1] += 40
    project = model.project
    model.project = lambda states, logits_range=None: project(states, logits_range) + bias.to(states.dtype)
    return model


@pytest.fixture(scope="module")
def pipes(processor):
    models = [_boosted(seed, how) for seed, how in PROFILES]
    return [OFAUFOPipeline(model=m, processor=processor, tokenizer=processor.tokenizer,
                           image_processor=processor.image_processor) for m in models]


@st.composite
def images(draw) -> Image.Image:
    width, height = draw(st.integers(8, 160)), draw(st.integers(8, 160))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _text(result: dict) -> None:
    assert isinstance(result["text"], str) and not SPECIAL.search(result["text"]), result
    assert 0.0 <= result["score"] <= 1.0


def _boxes(result: dict, image: Image.Image, most: int | None = None) -> None:
    boxes, labels, scores = result["boxes"], result["labels"], result["scores"]
    assert len(boxes) == len(labels) == len(scores) and (most is None or len(boxes) <= most), result
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height, (boxes, image.size)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(isinstance(label, str) and label and not SPECIAL.search(label) for label in labels), labels


def _no_duplicates(result: dict, nms_iou: float) -> None:
    pairs = [(a, b) for i, a in enumerate(zip(result["boxes"], result["labels"]))
             for b in list(zip(result["boxes"], result["labels"]))[i + 1 :]]
    assert all(la != lb or box_iou(ba, bb) <= nms_iou for (ba, la), (bb, lb) in pairs), result


def _ranked(result: dict, key: str, choices: list[str]) -> None:
    assert result[key] in choices and result[key] == result["top_k"][0][key], result
    assert {r[key] for r in result["top_k"]} <= set(choices) and len({r[key] for r in result["top_k"]}) == len(
        result["top_k"])


def _choice(result: dict, task: str) -> None:
    classes = list(get_task(task).classes)
    assert result["label"] in classes and set(result["scores"]) == set(classes)
    assert math.isclose(sum(result["scores"].values()), 1.0, rel_tol=1e-5)


def _embedding(result: dict, pipe) -> None:
    vector = np.asarray(result["embedding"])
    assert vector.shape == (pipe.model.config.d_model,) and np.isfinite(vector).all()
    assert math.isclose(float(np.linalg.norm(vector)), 1.0, rel_tol=1e-4)


def _generated(result: dict, size: int) -> None:
    assert result["image"].size == (size, size) and all(i.size == (size, size) for i in result["images"])
    assert all(math.isfinite(lp) and lp <= 0 for lp in result["logprobs"])


# ---- one case per task: (draw the call's arguments, check the result) ----------------------------


def caption(data, pipe, image):
    _text(pipe(image, task="caption"))


def vqa(data, pipe, image):
    question = data.draw(st.sampled_from(WORDS))
    if data.draw(st.booleans()):
        _text(pipe(image, task="vqa", text=question))
        return
    candidates = data.draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=4, unique=True))
    result = pipe(image, task="vqa", text=question, candidates=candidates, top_k=data.draw(st.integers(1, 4)))
    _ranked(result, "text", candidates)


def grounding(data, pipe, image):
    most = data.draw(st.integers(1, 4))
    result = pipe(image, task="grounding", text=data.draw(st.sampled_from(WORDS)), max_boxes=most,
                  allow_none=data.draw(st.booleans()))
    _boxes(result, image, most)
    _no_duplicates(result, 0.7)


def grounded_caption(data, pipe, image):
    x0, x1 = sorted(data.draw(st.lists(st.integers(0, image.width), min_size=2, max_size=2)))
    y0, y1 = sorted(data.draw(st.lists(st.integers(0, image.height), min_size=2, max_size=2)))
    _text(pipe(image, task="grounded_caption", box=[x0, y0, x1, y1]))


def itm(data, pipe, image):
    _choice(pipe(image, task="itm", text=data.draw(st.sampled_from(WORDS))), "itm")


def entailment(data, pipe, image):
    premise = data.draw(st.sampled_from([None, *WORDS]))
    _choice(pipe(image, task="entailment", text=data.draw(st.sampled_from(WORDS)), premise=premise), "entailment")


def classification(data, pipe, image):
    labels = data.draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=5, unique=True))
    _ranked(pipe(image, task="classification", labels=labels, top_k=data.draw(st.integers(1, 5))), "label", labels)


def detection(data, pipe, image):
    nms_iou = data.draw(st.sampled_from([None, 0.3, 0.5]))
    labels = data.draw(st.sampled_from([None, LABELS[:3]]))  # "Square" comes back as written
    options = {k: v for k, v in (("nms_iou", nms_iou), ("labels", labels)) if v is not None}
    result = pipe(image, task="detection", **options)
    _boxes(result, image)
    _no_duplicates(result, 0.7 if nms_iou is None else nms_iou)
    if labels:
        assert set(result["labels"]) <= set(labels), result


DENSE_LABELS = ["red circle", "blue square", "green star"]
_DENSE_PIPES: list[OFAUFOPipeline] = []


def _dense_pipe(pipe) -> OFAUFOPipeline:
    """A tiny model with a dense head whose class scores start near 1 (every anchor a candidate, the most
    boxes NMS and clipping ever see), with `pipe`'s processor; built once."""
    if not _DENSE_PIPES:
        model = tiny_model(0, dense_head={"preset": "tiny", "labels": DENSE_LABELS})
        with torch.no_grad():
            for conv in model.dense_head.head.cls:
                conv.bias.add_(9.0)
        _DENSE_PIPES.append(OFAUFOPipeline(model=model, processor=pipe.processor, tokenizer=pipe.tokenizer,
                                           image_processor=pipe.image_processor))
    return _DENSE_PIPES[0]


def dense_detection(data, pipe, image):
    nms_iou = data.draw(st.sampled_from([None, 0.3, 0.5]))
    labels = data.draw(st.sampled_from([None, DENSE_LABELS[:2]]))
    most = data.draw(st.integers(1, 30))
    options = {k: v for k, v in (("nms_iou", nms_iou), ("labels", labels)) if v is not None}
    result = _dense_pipe(pipe)(image, task="dense_detection", max_detections=most, **options)
    _boxes(result, image, most)
    _no_duplicates(result, (0.6 if nms_iou is None else nms_iou) + 1e-3)  # IoU of boxes rounded to 0.01 px
    assert set(result["labels"]) <= set(labels or DENSE_LABELS), result
    assert result["scores"] == sorted(result["scores"], reverse=True), result


def text_infill(data, pipe, image):
    _text(pipe(None, task="text_infill", text=data.draw(st.sampled_from(["a <mask> circle", "<mask> on gray"]))))


def text_to_image(data, pipe, image):
    _generated(pipe(None, task="text_to_image", text=data.draw(st.sampled_from(WORDS)), vqgan=VQGAN),
               VQGAN.config.resolution)


def image_infill(data, pipe, image):
    _generated(pipe(image, task="image_infill", vqgan=VQGAN), VQGAN.config.resolution)


def embedding(task: str):
    return lambda data, pipe, image: _embedding(pipe(image, task=task), pipe)


def free_prompt(data, pipe, image):
    _text(pipe(data.draw(st.sampled_from([image, None])), prompt=" " + data.draw(st.sampled_from(WORDS)) + "?"))


CASES = {
    "caption": caption, "vqa": vqa, "grounding": grounding, "grounded_caption": grounded_caption, "itm": itm,
    "entailment": entailment, "classification": classification, "detection": detection,
    "dense_detection": dense_detection,
    "text_infill": text_infill, "text_to_image": text_to_image, "image_infill": image_infill,
    **{task: embedding(task) for task in ("reid_person", "reid_vehicle", "face", "product")},
}


def test_every_registered_task_has_a_case():
    assert set(CASES) == set(ofa_ufo.list_tasks())


@pytest.mark.parametrize("name", [*sorted(CASES), "free prompt"])
def test_outputs_are_well_formed(pipes, name):
    case = CASES.get(name, free_prompt)

    @SETTINGS
    @given(profile=st.integers(0, len(PROFILES) - 1), image=images(), data=st.data())
    def check(profile, image, data):
        case(data, pipes[profile], image)

    check()


def test_free_prompt_may_ask_for_bins_and_codes(pipes):
    """`text_only=False` lifts the ban: the boosted model then answers in bins and codes."""
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    assert SPECIAL.search(pipes[0](image, prompt=" where is it?", text_only=False)["text"])
    _text(pipes[0](image, prompt=" where is it?"))
    with pytest.raises(TypeError, match="text_only must be True or False"):
        pipes[0](image, prompt=" where is it?", text_only="no")
