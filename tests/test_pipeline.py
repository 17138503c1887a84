"""pipeline('ofa-ufo'): registration in a fresh process, task outputs, batching, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

import ofa_ufo


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return pipeline("ofa-ufo", model=str(tiny_checkpoint))


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 70 - 5 * i, 3), dtype=np.uint8)) for i in range(4)]


def test_pipeline_after_import_in_fresh_process(tiny_checkpoint, tmp_path):
    image_path = tmp_path / "photo.png"
    Image.new("RGB", (50, 30), (200, 10, 10)).save(image_path)
    code = (
        "import json, ofa_ufo\n"
        "from transformers import pipeline\n"
        f"pipe = pipeline('ofa-ufo', model={str(tiny_checkpoint)!r})\n"
        f"print(json.dumps(pipe({str(image_path)!r}, task='caption', max_new_tokens=4)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(answer) == {"text", "score"} and 0.0 <= answer["score"] <= 1.0


def test_task_outputs_are_json_ready(pipe, photos):
    caption = pipe(photos[0], task="caption", max_new_tokens=5)
    vqa = pipe(photos[0], task="vqa", text="What color is the square")
    free = pipe(photos[0], prompt=" what is in the corner?", max_new_tokens=5)
    grounding = pipe(photos[1], task="grounding", text="the red circle")
    for result in (caption, vqa, free, grounding):
        json.dumps(result)
    assert 0.0 <= caption["score"] <= 1.0 and isinstance(caption["text"], str)
    assert set(grounding) == {"boxes", "labels", "scores"}
    (x0, y0, x1, y1), (w, h) = grounding["boxes"][0], photos[1].size
    assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
    assert grounding["labels"] == ["the red circle"] and 0.0 <= grounding["scores"][0] <= 1.0


def test_text_only_prompt(pipe):
    result = pipe(None, prompt=" what is the complete text of \" a red <mask> \"?", max_new_tokens=4)
    assert isinstance(result["text"], str)


def test_batch_returns_one_result_per_input_in_order(pipe, photos):
    singles = [pipe(photo, task="caption", max_new_tokens=6) for photo in photos]
    batched = pipe(photos, task="caption", batch_size=3, max_new_tokens=6)
    assert [r["text"] for r in batched] == [r["text"] for r in singles]
    np.testing.assert_allclose([r["score"] for r in batched], [r["score"] for r in singles], rtol=1e-4, atol=1e-9)


def test_num_return_sequences_gives_candidates(pipe, photos):
    result = pipe(photos[0], task="caption", num_beams=3, num_return_sequences=3, max_new_tokens=4)
    assert len(result["candidates"]) == 3


def test_bad_image_in_batch_is_an_error_record(pipe, photos, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    results = pipe([photos[0], str(not_image), photos[1]], task="caption", batch_size=3, max_new_tokens=4)
    assert "error" in results[1] and "notes.txt" in results[1]["error"]
    assert "text" in results[0] and "text" in results[2]


def test_bad_arguments(pipe, photos):
    with pytest.raises(ValueError, match="Unknown task 'segmentation'.*caption"):
        pipe(photos[0], task="segmentation")
    with pytest.raises(ValueError, match="task=.*prompt"):
        pipe(photos[0])
    result = pipe(photos[0], task="vqa")
    assert "question" in result["error"]


def test_list_tasks_covers_pipeline_tasks():
    assert {"caption", "vqa", "grounding"} <= set(ofa_ufo.list_tasks())


def test_vqa_answer_is_never_empty(pipe, photos):
    """Unnormalised beam scores favour stopping at once; an answer needs at least one token."""
    assert pipe(photos[2], task="vqa", text="is there a red circle?")["text"].strip()
