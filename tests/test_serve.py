"""`ofa-ufo serve`: the demo's request logic on a tiny model, and the served app through Gradio's HTTP API."""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ofa_ufo
from ofa_ufo.cli import serve
from ofa_ufo.cli.main import main
from ofa_ufo.cli.web_demo import Demo, cosine, draw_boxes, parse_box, render
from ofa_ufo.tasks import get_task


@pytest.fixture(scope="module")
def demo(tiny_checkpoint) -> Demo:
    return Demo(tiny_checkpoint)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("serve") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_request_passes_text_and_options_only_where_the_task_takes_them(demo):
    assert demo.request(get_task("vqa"), " what color? ") == {"task": "vqa", "text": "what color?"}
    assert demo.request(get_task("face"), "left over text") == {"task": "face"}
    assert demo.request(get_task("classification"), labels="cat, dog,") == {"task": "classification", "labels": ["cat", "dog"]}
    assert demo.request(get_task("vqa"), "q", labels="red,blue") == {"task": "vqa", "text": "q", "candidates": ["red", "blue"]}
    assert demo.request(get_task("caption"), labels="cat", box="1 2 3 4") == {"task": "caption"}
    assert demo.request(get_task("grounded_caption"), box="1, 2, 30, 40") == {"task": "grounded_caption",
                                                                              "box": [1.0, 2.0, 30.0, 40.0]}
    assert demo.request(demo.task_of("free prompt"), "what is it?") == {"prompt": " what is it?"}


def test_parse_box_names_the_field():
    with pytest.raises(ValueError, match="box: expected four numbers"):
        parse_box("1 2 3")


def test_tasks_are_the_models_own_and_image_generation_needs_a_vqgan(demo, tiny_checkpoint):
    names = demo.pipe.model.config.vision_config.task_names
    assert demo.tasks == [n for n in names if n not in ("text_to_image", "image_infill")] + ["prompt"]
    with pytest.raises(ValueError, match="not served by this model"):
        demo.task_of("text_to_image")


def test_draw_boxes_outlines_each_box_in_its_colour():
    image = Image.new("RGB", (200, 160), "black")
    drawn = draw_boxes(image, [[40, 60, 150, 140]], ["cat"], [0.9])
    assert drawn.size == image.size and image.getpixel((40, 100)) == (0, 0, 0)
    assert drawn.getpixel((40, 100)) == drawn.getpixel((150, 100)) == (0xE6, 0x19, 0x4B)
    assert drawn.getpixel((95, 100)) == (0, 0, 0)  # inside the box: untouched
    assert drawn.getpixel((60, 50)) != (0, 0, 0)  # the label tag sits above the box


def test_render_follows_the_result_schema():
    image = Image.new("RGB", (100, 80), "black")
    boxes = render({"boxes": [[1, 2, 50, 60]], "labels": ["dog"], "scores": [0.5]}, image)
    assert boxes.text.startswith("1 box(es): dog") and boxes.rows == [["dog", 0.5, 1, 2, 50, 60]]
    assert boxes.image.size == image.size and boxes.image.tobytes() != image.tobytes()
    assert render({"boxes": [], "labels": [], "scores": []}, image).text == "0 box(es): no box found"
    top = render({"label": "cat", "score": 0.6, "top_k": [{"label": "dog", "score": 0.1}, {"label": "cat", "score": 0.6}]}, image)
    assert top.headers == ["label", "score"] and top.rows == [["cat", 0.6], ["dog", 0.1]]
    assert render({"label": "a", "score": 1 / 3, "top_k": [{"label": "a", "score": 1 / 3}]}, image).rows == [["a", 0.3333]]
    itm = render({"label": "no", "score": 0.7, "scores": {"yes": 0.3, "no": 0.7}}, image)
    assert itm.rows == [["no", 0.7], ["yes", 0.3]] and itm.text == "no  (score 0.7)"
    assert render({"text": "a cat", "score": 0.25}, image).text == "a cat  (score 0.25)"
    several = render({"candidates": [{"text": "a", "score": 0.5}, {"text": "b", "score": 0.25}]}, image)
    assert several.text.splitlines() == ["a  (score 0.5)", "b  (score 0.25)"]
    generated = render({"image": image, "images": [image, image], "logprobs": [-1.0, -2.0]}, None)
    assert generated.image is image and len(generated.gallery) == 2


def test_cosine():
    assert cosine([1.0, 0.0], [0.0, 2.0]) == 0.0 and cosine([3.0, 4.0], [6.0, 8.0]) == pytest.approx(1.0)


def test_demo_answers_as_the_pipeline_does(demo, photo):
    expected = demo.pipe(photo, task="grounding", text="the cat")
    answer = demo.run("grounding", photo, "the cat")
    assert answer.rows == [[label, float(f"{score:.4g}"), *[round(v, 1) for v in box]]
                           for box, label, score in zip(expected["boxes"], expected["labels"], expected["scores"])]
    assert answer.image.tobytes() == draw_boxes(Image.open(photo), expected["boxes"], expected["labels"],
                                                expected["scores"]).tobytes()
    caption = demo.pipe(photo, task="caption")
    assert demo.run("caption", photo).text == f"{caption['text']}  (score {caption['score']:.4g})"
    ranked = demo.run("classification", photo, labels="cat, dog, rocket")
    assert sorted(row[0] for row in ranked.rows) == ["cat", "dog", "rocket"] and ranked.text.split()[0] == ranked.rows[0][0]


def test_embedding_tasks_compare_two_images(demo, photo):
    same = demo.run("face", photo, second_image=photo)
    assert same.text == "similarity (cosine) 1.0000"
    other = Image.new("RGB", (90, 70), "white")
    a, b = demo.pipe(photo, task="face")["embedding"], demo.pipe(other, task="face")["embedding"]
    assert demo.run("face", photo, second_image=other).text == f"similarity (cosine) {cosine(a, b):.4f}"
    assert demo.run("reid_person", photo).text.startswith("embedding of ")


@pytest.mark.parametrize("task, image, fields, message", [
    ("caption", None, {}, "task 'caption' needs an image"),
    ("caption", "missing.png", {}, "image file not found: missing.png"),
    ("classification", "PHOTO", {}, "needs labels="),
    ("grounded_caption", "PHOTO", {"box": "1 2"}, "box: expected four numbers"),
    ("free prompt", "PHOTO", {}, "free prompt needs a prompt"),
])
def test_bad_requests_raise_errors_that_name_the_input(demo, photo, task, image, fields, message):
    with pytest.raises(ValueError, match=message):
        demo.run(task, photo if image == "PHOTO" else image, **fields)


def test_model_calls_from_many_threads_run_on_one(demo, photo, monkeypatch):
    """Server worker threads hand model calls to one thread (torch's per-thread state would grow)."""
    callers, pipe = set(), demo.pipe

    def recording(*args, **kwargs):
        callers.add(threading.get_ident())
        return pipe(*args, **kwargs)

    monkeypatch.setattr(demo, "pipe", recording)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: demo.run("itm", photo, "a cat").text, range(8)))
    assert len(callers) == 1 and threading.get_ident() not in callers and len(set(answers)) == 1


def test_unreadable_upload_names_the_file(demo, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png: not an image file"):
        demo.run("caption", str(tmp_path / "bad.png"))


def test_image_generation_is_served_with_a_vqgan_beside_the_model(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    ofa_ufo.create_vqgan("vqgan_tiny").save_pretrained(tmp_path / "vqgan")
    with_vqgan = Demo(tmp_path)
    assert {"text_to_image", "image_infill"} <= set(with_vqgan.tasks)
    answer = with_vqgan.run("text_to_image", None, "a red circle")
    assert answer.text.startswith("1 generated image(s)") and answer.gallery[0].size == (64, 64)


def test_serve_command_help_and_bad_model(tmp_path, capsys):
    assert main(["serve", "--help"]) == 0
    assert "--port" in capsys.readouterr().out
    assert main(["serve", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a save_pretrained model directory" in err
    assert main(["serve", "--model", str(tmp_path), "--port", "7860", "--concurrency", "0"]) == 2


def test_serve_without_gradio_names_the_extra(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(serve, "find_spec", lambda name: None)
    assert main(["serve", "--model", str(tiny_checkpoint)]) == 1
    assert "pip install 'ofa-ufo[serve]'" in capsys.readouterr().err


def test_served_app_answers_and_reports_bad_images_over_http(demo, photo, tmp_path):
    gradio_client = pytest.importorskip("gradio_client", reason="the [serve] extra (gradio) is not installed")
    port = free_port()
    app = serve.launch(demo, "127.0.0.1", port, block=False)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        text, drawn, table, gallery = client.predict("grounding", gradio_client.handle_file(photo), "the cat", "", "",
                                                     None, api_name="/run")
        assert text == demo.run("grounding", photo, "the cat").text
        assert Image.open(drawn).size == (160, 120) and table["headers"][0] == "label" and gallery == []
        (tmp_path / "bad.png").write_bytes(b"not an image")
        with pytest.raises(gradio_client.exceptions.AppError, match="ImageLoadError: .*bad.png: not an image file"):
            client.predict("caption", gradio_client.handle_file(str(tmp_path / "bad.png")), "", "", "", None,
                           api_name="/run")
        assert client.predict("caption", gradio_client.handle_file(photo), "", "", "", None, api_name="/run")[0]
    finally:
        app.close()


@pytest.mark.slow
def test_load_test_script_passes_a_short_run(capsys, monkeypatch):
    """benchmarks/load_test.py end to end, briefly: its checks pass and its table is printed."""
    pytest.importorskip("gradio_client", reason="the [serve] extra (gradio) is not installed")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    load_test = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "load_test", load_test)  # its dataclass looks its module up
    spec.loader.exec_module(load_test)
    assert load_test.main(["--clients", "2", "--duration", "10", "--bad-every", "2", "--window", "3"]) == 0
    out = capsys.readouterr().out
    assert "| requests/s |" in out and "| bad: empty file |" in out and "FAILED" not in out
