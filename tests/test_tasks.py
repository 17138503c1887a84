"""Every registered task end to end through the pipeline on a tiny random model, plus the
constraint processors and output parsers on hand-made token sequences."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from transformers import pipeline

import ofa_ufo
from ofa_ufo.generation.constraints import BoxSequenceLogitsProcessor, DetectionLogitsProcessor
from ofa_ufo.generation.scoring import Decoded
from ofa_ufo.tasks import get_task

VQGAN = ofa_ufo.create_vqgan("vqgan_tiny").eval()  # image-generation tasks decode codes with it
TEXT_ONLY = {"text_infill", "text_to_image"}  # tasks called without an image
IMAGE_GEN = {"text_to_image", "image_infill"}  # results hold PIL images; covered on real photos in test_image_gen
EMBEDDING = {"reid_person", "reid_vehicle", "face", "product"}  # results are vectors; generate options are errors

# How to call each task and the keys its result must have. A new task needs a row here.
CALLS = {
    "caption": (dict(), {"text", "score"}),
    "vqa": (dict(text="what color is it"), {"text", "score"}),
    "grounding": (dict(text="the red circle", max_boxes=3), {"boxes", "labels", "scores"}),
    "grounded_caption": (dict(box=[5, 5, 40, 30]), {"text", "score"}),
    "itm": (dict(text="a red circle"), {"label", "score", "scores"}),
    "entailment": (dict(text="there is a circle", premise="a red circle on gray"), {"label", "score", "scores"}),
    "classification": (dict(labels=["circle", "square", "red star"], top_k=2), {"label", "score", "top_k"}),
    "detection": (dict(max_new_tokens=20), {"boxes", "labels", "scores"}),
    "dense_detection": (dict(score_threshold=0.0, max_detections=5), {"boxes", "labels", "scores"}),
    "text_infill": (dict(text="a red <mask> on a gray background", max_new_tokens=6), {"text", "score"}),
    "text_to_image": (dict(text="a red circle", vqgan=VQGAN), {"image", "images", "logprobs"}),
    "image_infill": (dict(vqgan=VQGAN), {"image", "images", "logprobs"}),
    **{task: (dict(), {"embedding"}) for task in EMBEDDING},
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, processor):
    """conftest's tiny model plus a dense head (for dense_detection; the other tasks never run it), saved."""
    path = tmp_path_factory.mktemp("tiny_dense_ckpt")
    head = {"preset": "tiny", "labels": ["red circle", "blue square", "green star"]}
    tiny_model(dense_head=head).save_pretrained(path)
    processor.save_pretrained(path)
    return pipeline("ofa-ufo", model=str(path))


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8))


def test_every_task_has_a_call():
    assert set(ofa_ufo.list_tasks()) == set(CALLS)


@pytest.mark.parametrize("task", sorted(CALLS))
def test_task_end_to_end(pipe, photo, task):
    kwargs, keys = CALLS[task]
    image = None if task in TEXT_ONLY else photo
    result = pipe(image, task=task, **kwargs)
    assert set(result) == keys, result
    json.dumps({k: v for k, v in result.items() if k not in ("image", "images")})
    if "boxes" in result:
        assert len(result["boxes"]) == len(result["labels"]) == len(result["scores"])
        for x0, y0, x1, y1 in result["boxes"]:
            assert 0 <= x0 <= x1 <= photo.width and 0 <= y0 <= y1 <= photo.height
    if "scores" in result and isinstance(result["scores"], dict):
        assert abs(sum(result["scores"].values()) - 1.0) < 1e-5
    if "top_k" in result:
        assert [r["label"] for r in result["top_k"]][0] == result["label"]
        assert {r["label"] for r in result["top_k"]} <= {"circle", "square", "red star"}


def test_closed_set_vqa_returns_top_k(pipe, photo):
    result = pipe(photo, task="vqa", text="what shape is it?", candidates=["circle", "square", "star"], top_k=3)
    assert len(result["top_k"]) == 3 and {r["text"] for r in result["top_k"]} == {"circle", "square", "star"}
    scores = [r["score"] for r in result["top_k"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-5


def test_missing_task_options_fail_the_call(pipe, photo):
    with pytest.raises(ValueError, match="'classification' needs labels="):
        pipe(photo, task="classification")
    with pytest.raises(ValueError, match="'grounded_caption' needs box="):
        pipe([photo, photo], task="grounded_caption")


def _allowed(processor, ids):
    scores = torch.zeros(1, 40)
    return torch.isfinite(processor(torch.tensor([[0] + ids]), scores))[0].nonzero().flatten().tolist()


def test_box_sequence_constraint():
    corners = list(range(20, 29))  # x0 / y0: any bin but the last, so that x1 > x0 and y1 > y0 can follow
    proc = BoxSequenceLogitsProcessor(20, 30, eos_token_id=2, max_boxes=2, none_token_id=7)
    assert _allowed(proc, []) == [7] + corners
    assert _allowed(proc, [7]) == [2]
    assert _allowed(proc, [21]) == corners
    assert _allowed(proc, [21, 22]) == list(range(22, 30))  # x1 > x0 = 21
    assert _allowed(proc, [21, 22, 23]) == list(range(23, 30))  # y1 > y0 = 22
    assert _allowed(proc, [28, 28, 29]) == [29]
    assert _allowed(proc, [21, 22, 23, 24]) == [2] + corners
    assert _allowed(proc, [21, 22, 23, 24, 25, 26]) == list(range(26, 30))  # the second box: x1 > 25
    assert _allowed(proc, [21, 22, 23, 24, 25, 26, 27, 28]) == [2]


def test_detection_constraint_with_label_trie():
    trie = ofa_ufo.generation.Trie([[10, 11, 2], [12, 2]])
    proc = DetectionLogitsProcessor(20, 30, eos_token_id=2, text_end=15, special_ids=[0, 1, 2, 3], label_trie=trie)
    corners = list(range(20, 29))  # x0 / y0 leave room for x1 > x0, y1 > y0
    assert _allowed(proc, []) == [2] + corners
    assert _allowed(proc, [21, 22]) == list(range(22, 30))  # x1 > x0 = 21
    assert _allowed(proc, [21, 22, 23]) == list(range(23, 30))  # y1 > y0 = 22
    assert _allowed(proc, [21, 22, 23, 24]) == [10, 12]
    assert _allowed(proc, [21, 22, 23, 24, 10]) == [11]
    assert _allowed(proc, [21, 22, 23, 24, 10, 11]) == [2] + corners
    assert _allowed(proc, [21, 22, 23, 24, 10, 11, 25, 27]) == list(range(26, 30))  # the second box: x1 > 25
    free = DetectionLogitsProcessor(20, 30, eos_token_id=2, text_end=15, special_ids=[0, 1, 2, 3])
    assert _allowed(free, [21, 22, 23, 24]) == list(range(4, 15))
    assert _allowed(free, [21, 22, 23, 24, 9]) == [2] + list(range(4, 15)) + corners


def test_detection_parsing_scores_and_dedupe(processor):
    tok = processor.tokenizer
    b = tok.bin_offset
    red = tok(" red circle", add_special_tokens=False)["input_ids"]
    meta = dict(original_size=(1000, 1000), input_size=(64, 64), box_codec=processor.box_codec, options={}, text=None)
    box = [b + 0, b + 0, b + 499, b + 499]
    near = [b + 1, b + 1, b + 499, b + 499]
    far = [b + 600, b + 600, b + 999, b + 999]
    tokens = box + red + near + red + far + red
    logprobs = [0.0] * 4 + [np.log(0.9)] + [0.0] * (len(red) - 1) + [0.0] * 4 + [np.log(0.5)] + [0.0] * (len(red) - 1) \
        + [0.0] * 4 + [np.log(0.7)] + [0.0] * (len(red) - 1)
    result = get_task("detection").answer(Decoded(tokens, logprobs), tok, meta)
    assert result["labels"] == ["red circle", "red circle"]
    np.testing.assert_allclose(result["scores"], [0.9, 0.7])
    assert result["boxes"][0] == [0.0, 0.0, 499.5, 499.5]


def test_grounding_training_targets(processor):
    task = get_task("grounding")
    meta = dict(original_size=(100, 50), input_size=(64, 64), box_codec=processor.box_codec)
    _, one = task.build_example({"text": "the cat", "box": [0, 0, 100, 50]}, meta)
    _, two = task.build_example({"text": "cats", "boxes": [[0, 0, 10, 10], [50, 0, 100, 50]]}, meta)
    _, none = task.build_example({"text": "a dog", "boxes": []}, meta)
    assert one == "<bin_0> <bin_0> <bin_999> <bin_999>" and two.count("<bin_") == 8 and none == " none"
    ids = processor.tokenizer(none, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, "the no-object target must be one token"


def test_every_task_is_documented():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text(encoding="utf-8")
    assert all(f"| `{task}` |" in page for task in ofa_ufo.list_tasks())


def _derived_photo_examples(task: str) -> list[dict]:
    """Real-photo examples for tasks the labels file does not list directly, built from its captions and boxes."""
    from ofa_ufo.data.real_photos import real_photo_examples

    captions, groundings = real_photo_examples("caption")[:2], real_photo_examples("grounding")[:2]
    derive = {
        "itm": lambda e: {**e, "task": "itm", "text": e["target"], "target": "yes"},
        "entailment": lambda e: {**e, "task": "entailment", "text": e["target"], "target": "entailment"},
        "text_infill": lambda e: {**e, "task": "text_infill", "image": None,
                                  "text": e["target"].replace(e["target"].split()[-1], "<mask>")},
        "grounded_caption": lambda e: {**e, "task": "grounded_caption", "target": e["text"]},
        **{name: lambda e, name=name: {**e, "task": name, "meta": {"identity": e["id"]}} for name in EMBEDDING},
        "dense_detection": lambda e: {**e, "task": "dense_detection"},
    }
    sources = {"grounded_caption": groundings, "dense_detection": real_photo_examples("detection")[:2]}
    source = sources.get(task, captions)
    return [derive[task](e) for e in source] if task in derive else real_photo_examples(task)[:2]


@pytest.mark.parametrize("task", sorted(set(CALLS) - IMAGE_GEN))
def test_real_photos_smoke_every_task(pipe, task):
    """The hand-labelled real photos go through every task with the documented schema."""
    pytest.importorskip("skimage")
    from ofa_ufo.data.real_photos import real_photo_examples

    examples = _derived_photo_examples(task)
    labels = sorted({e["target"] for e in real_photo_examples("classification")})
    spec = get_task(task)
    assert examples
    for example in examples:
        generation = {} if task in EMBEDDING | {"dense_detection"} else dict(max_new_tokens=12)
        result = pipe(example["image"], task=task, **generation, **spec.pipeline_call(example, labels))
        assert set(result) == CALLS[task][1], result
        prediction, reference = spec.metric_pair(result, example)
        assert reference is not None


def test_text_tasks_ban_codes_and_bins(model, processor):
    """Caption / VQA / grounded caption / text infill / free prompts decode text only: every id from the
    first <code_N> on is -inf (the free prompt lifts the ban on request)."""
    config, tok = model.config, processor.tokenizer
    scores = torch.zeros(2, config.vocab_size)
    for name, options in [("caption", {}), ("vqa", {}), ("grounded_caption", {}), ("text_infill", {}), ("prompt", {})]:
        (ban,) = get_task(name).generate_kwargs(config, tok, options)["logits_processor"]
        kept = torch.isfinite(ban(torch.zeros(2, 1, dtype=torch.long), scores))
        assert kept[:, : config.code_offset].all() and not kept[:, config.code_offset :].any(), name
    assert "logits_processor" not in get_task("prompt").generate_kwargs(config, tok, {"text_only": False})


def test_callers_logits_processor_runs_after_the_task_constraints(pipe, photo, model):
    seen = []

    def record(input_ids, scores):
        seen.append(torch.isfinite(scores[:, model.config.code_offset :]).any().item())
        return scores

    pipe(photo, task="caption", max_new_tokens=3, num_beams=1, logits_processor=[record])
    assert seen and not any(seen)  # the ban ran before the caller's processor, and still runs


def _detection_tokens(tok, objects):
    """(tokens, logprobs) of `<bin>x4 label` objects given as (bins, label, label probability)."""
    tokens, logprobs = [], []
    for bins, label, probability in objects:
        ids = tok(" " + label, add_special_tokens=False)["input_ids"]
        tokens += [tok.bin_offset + b for b in bins] + ids
        logprobs += [0.0] * 4 + [float(np.log(probability))] + [0.0] * (len(ids) - 1)
    return Decoded(tokens, logprobs)


def test_detection_nms_option_and_degenerate_boxes(processor):
    """Bins on a 1000 x 1000 image: [0,0,499,499] -> [0,0,499.5,499.5]; [0,0,499,249] -> [0,0,499.5,249.25],
    IoU 249.25 / 499.5 = 0.499 with the first; [500,500,500,600] has no width."""
    tok, task = processor.tokenizer, get_task("detection")
    decoded = _detection_tokens(tok, [([0, 0, 499, 499], "red circle", 0.9), ([0, 0, 499, 249], "red circle", 0.7),
                                      ([0, 0, 499, 249], "blue star", 0.6), ([500, 500, 500, 600], "red circle", 0.8)])
    meta = dict(original_size=(1000, 1000), input_size=(64, 64), box_codec=processor.box_codec, text=None)
    default = task.answer(decoded, tok, {**meta, "options": {}})
    assert default["labels"] == ["red circle", "red circle", "blue star"]  # 0.499 <= 0.7; the flat box dropped
    strict = task.answer(decoded, tok, {**meta, "options": {"nms_iou": 0.3}})
    assert strict["labels"] == ["red circle", "blue star"] and strict["scores"] == pytest.approx([0.9, 0.6])
    assert strict["boxes"] == [[0.0, 0.0, 499.5, 499.5], [0.0, 0.0, 499.5, 249.25]]  # class-aware: blue star kept


def test_grounding_drops_repeated_and_flat_boxes(processor):
    tok, task = processor.tokenizer, get_task("grounding")
    boxes = [[0, 0, 499, 499], [600, 600, 999, 999], [1, 1, 499, 499], [700, 700, 700, 800]]
    tokens = [tok.bin_offset + b for box in boxes for b in box]
    probabilities = (0.5, 0.9, 0.8, 0.9)  # one per box, carried by its first bin
    logprobs = [float(np.log(probabilities[i // 4])) if i % 4 == 0 else 0.0 for i in range(16)]
    meta = dict(original_size=(1000, 1000), input_size=(64, 64), box_codec=processor.box_codec, text="the circles")
    result = task.answer(Decoded(tokens, logprobs), tok, {**meta, "options": {}})
    # box 3 repeats box 1 (IoU 0.996) with a better score: box 1 goes; box 4 is flat; the order generated stays
    assert result["boxes"] == [[600.6, 600.6, 1000.0, 1000.0], [1.0, 1.0, 499.5, 499.5]]
    assert result["scores"] == pytest.approx([0.9, 0.8]) and result["labels"] == ["the circles"] * 2


@pytest.mark.parametrize("value, error", [("high", TypeError), (True, TypeError), (1.5, ValueError)])
def test_bad_nms_iou_fails_the_call(pipe, photo, value, error):
    with pytest.raises(error, match="nms_iou must be"):
        pipe(photo, task="detection", nms_iou=value)


def test_closed_set_answers_come_back_as_written(pipe, photo):
    labels = ["Red Star", "circle"]
    result = pipe(photo, task="classification", labels=labels, top_k=2)
    assert result["label"] in labels and {r["label"] for r in result["top_k"]} == set(labels)
