"""The web demo behind `ofa-ufo serve`: one loaded model, any of its tasks, answers drawn for people.

`Demo` turns one request (task, image, text, labels, box, second image) into an `Answer`: the answer
line with its score, the image with boxes drawn, a table (top-k, boxes, class scores) and generated
images. It knows nothing of the UI, so tests call it directly; `build_app` wraps it in Gradio Blocks.
What is shown follows the result's schema (docs/tasks.md), never the task's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from transformers import pipeline

from ofa_ufo.core.images import load_image
from ofa_ufo.data.real_photos import load_photo, photo_labels
from ofa_ufo.tasks import FREE_PROMPT, Task, get_task, list_tasks
from ofa_ufo.tasks.image_gen import VQGAN_SUBDIR

__all__ = ["Answer", "Demo", "build_app", "cosine", "draw_boxes", "parse_box", "render"]

FREE_PROMPT_LABEL = "free prompt"
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")
LABEL_CHARS = 40  # a random model's labels can be hundreds of characters: drawn labels are cut
# Request fields that fill a task's options of the same name (classification labels, VQA candidates, ...).
LIST_OPTIONS = ("labels", "candidates")
BAD_INPUT = (ValueError, TypeError, OSError)  # what a request's own inputs can raise (ImageLoadError is a ValueError)


@dataclass
class Answer:
    """What the page shows for one request."""

    text: str
    image: Image.Image | None = None
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    gallery: list[Image.Image] = field(default_factory=list)


def takes_text(task: Task) -> bool:
    """Whether the task reads the request's text (a question, a phrase, a caption to draw)."""
    return task.name == FREE_PROMPT or "text" in task.example_fields


def parse_box(text: str) -> list[float]:
    """`"x0 y0 x1 y1"` (spaces or commas) -> four floats, for grounded captioning."""
    numbers = text.replace(",", " ").split()
    if len(numbers) != 4:
        raise ValueError(f"box: expected four numbers 'x0 y0 x1 y1' in pixels, got {text!r}")
    return [float(n) for n in numbers]


def _split_list(text: str) -> list[str] | None:
    items = [item.strip() for item in text.split(",") if item.strip()]
    return items or None


@cache
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_boxes(image: Image.Image, boxes: list[list[float]], labels: list[str], scores: list[float]) -> Image.Image:
    """A copy of `image` with each box outlined and tagged `label score` (boxes in original pixels)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 200))
    font = _font(max(12, round(max(out.size) / 40)))
    for i, (box, label, score) in enumerate(zip(boxes, labels, scores)):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = box
        draw.rectangle([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)], outline=colour, width=width)
        _tag(draw, (x0, y0), f"{label[:LABEL_CHARS]} {score:.2g}", colour, font, out.width)
    return out


def _tag(draw: ImageDraw.ImageDraw, corner: tuple[float, float], text: str, colour: str, font, image_width: int) -> None:
    """White text on a filled strip just above `corner` (below it at the top edge), kept inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x = max(0.0, min(corner[0], image_width - w))
    y = corner[1] - h if corner[1] >= h else corner[1]
    draw.rectangle([x, y, x + w, y + h], fill=colour)
    draw.text((x + 2 - left, y + 2 - top), text, fill="white", font=font)


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two embeddings (they come L2-normalised; normalised again for safety)."""
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _round(score: float) -> float:
    """Four significant digits: what a table cell can show."""
    return float(f"{score:.4g}")


def _scored(label: Any, score: float | None) -> str:
    return f"{label}  (score {score:.4g})" if score is not None else str(label)


def render(result: dict[str, Any], image: Image.Image | None) -> Answer:
    """A pipeline result (any schema of docs/tasks.md) -> what the page shows."""
    if "candidates" in result:
        answers = [render(c, image) for c in result["candidates"]]
        return Answer("\n".join(a.text for a in answers), answers[0].image, ["answer"], [[a.text] for a in answers])
    if "boxes" in result:
        boxes, labels, scores = result["boxes"], result["labels"], result["scores"]
        text = "; ".join(_scored(label[:LABEL_CHARS], s) for label, s in zip(labels, scores)) or "no box found"
        rows = [[label, _round(score), *[round(v, 1) for v in box]] for box, label, score in zip(boxes, labels, scores)]
        drawn = draw_boxes(image, boxes, labels, scores) if image is not None else None
        return Answer(f"{len(boxes)} box(es): {text}", drawn, ["label", "score", "x0", "y0", "x1", "y1"], rows)
    if "images" in result:
        scores = ", ".join(f"{lp:.1f}" for lp in result.get("logprobs", []))
        return Answer(f"{len(result['images'])} generated image(s); log-probabilities {scores}",
                      result["image"], gallery=list(result["images"]))
    if "label" in result:
        ranked = result.get("top_k") or [{"label": k, "score": v} for k, v in result.get("scores", {}).items()]
        rows = sorted(([r["label"], _round(r["score"])] for r in ranked), key=lambda row: -row[1])
        return Answer(_scored(result["label"], result.get("score")), image, ["label", "score"], rows)
    if "text" in result:
        return Answer(_scored(result["text"] or "(empty answer)", result.get("score")), image)
    return Answer(f"result: {sorted(result)}", image)


def bundled_class_names() -> list[str]:
    """The bundled photos' class labels: a ready candidate list for classification."""
    return sorted({labels["class"] for labels in photo_labels().values()})


class Demo:
    """One model, loaded once, answering requests from many users (model calls run one at a time, on one thread)."""

    def __init__(self, model_dir: str | Path, device: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.pipe = pipeline("ofa-ufo", model=str(self.model_dir), device=device)
        self.tasks = self._servable_tasks()
        # One thread runs every model call, one at a time: calls from the server's many worker threads
        # would each grow torch's per-thread state (memory that is never given back)
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ofa-ufo-model")

    def _servable_tasks(self) -> list[str]:
        """The model's own tasks that this install can run, then the free prompt. Image generation is
        offered only with a VQGAN saved beside the model (`<model dir>/vqgan`)."""
        names = self.pipe.model.config.vision_config.task_names or list_tasks()
        has_vqgan = (self.model_dir / VQGAN_SUBDIR / "config.json").is_file()
        servable = [n for n in names if n in list_tasks() and (has_vqgan or "vqgan" not in get_task(n).options)]
        return [*servable, FREE_PROMPT]

    def task_of(self, name: str) -> Task:
        """The task behind a name the page shows (`free prompt` is the pseudo-task `prompt`)."""
        name = FREE_PROMPT if name == FREE_PROMPT_LABEL else name
        if name not in self.tasks:
            raise ValueError(f"task {name!r} is not served by this model; choose one of {self.tasks}")
        return get_task(name)

    def request(self, task: Task, text: str = "", labels: str = "", box: str = "") -> dict[str, Any]:
        """Pipeline keyword arguments for one request: the text only where the task reads it, and the
        fields named like the task's options."""
        text = text.strip()
        if task.name == FREE_PROMPT:
            if not text:
                raise ValueError("text: a free prompt needs a prompt to answer, e.g. 'what is in the corner?'")
            return {"prompt": " " + text}  # OFA prompts start with a space
        kwargs: dict[str, Any] = {"task": task.name}
        if text and takes_text(task):
            kwargs["text"] = text
        for name in LIST_OPTIONS:
            if name in task.options and _split_list(labels):
                kwargs[name] = _split_list(labels)
        if "box" in task.options and box.strip():
            kwargs["box"] = parse_box(box)
        return kwargs

    def _call(self, image: Image.Image | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self._model_thread.submit(self.pipe, image, **kwargs).result()

    def run(self, task: str, image: Any = None, text: str = "", labels: str = "", box: str = "",
            second_image: Any = None) -> Answer:
        """Answer one request; a bad input raises (ValueError, TypeError, OSError) with a message naming it.
        `image` and `second_image` are paths, PIL images or arrays; the second is compared with the first
        by the embedding tasks."""
        task_obj = self.task_of(task)
        kwargs = self.request(task_obj, text, labels, box)
        loaded = None if image is None else load_image(image)
        if loaded is None and task_obj.needs_image:
            raise ValueError(f"task {task_obj.name!r} needs an image: upload one or choose a bundled photo")
        result = self._call(loaded, kwargs)
        if "embedding" not in result:
            return render(result, loaded)
        if second_image is None:
            return Answer(f"embedding of {len(result['embedding'])} values; add a second image to compare", loaded)
        other = self._call(load_image(second_image), kwargs)
        similarity = cosine(result["embedding"], other["embedding"])
        return Answer(f"similarity (cosine) {similarity:.4f}", loaded, ["image", "embedding size"],
                      [["first", len(result["embedding"])], ["second", len(other["embedding"])]])


def build_app(demo: Demo) -> Any:
    """The Gradio Blocks page over `demo` (gradio is the optional `[serve]` extra)."""
    import gradio as gr  # optional: only `ofa-ufo serve` needs it (pip install 'ofa-ufo[serve]')

    photos = list(photo_labels()) if find_spec("skimage") else []  # the pixels ship with scikit-image
    choices = [FREE_PROMPT_LABEL if name == FREE_PROMPT else name for name in demo.tasks]
    with gr.Blocks(title="OFA-UFO demo", analytics_enabled=False) as app:
        note = "" if photos else " (bundled photos need scikit-image: `pip install 'ofa-ufo[demo]'`)"
        gr.Markdown(f"## OFA-UFO demo\nModel: `{demo.model_dir}`. Pick a task, give an image, run.{note}")
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    task = gr.Dropdown(choices, value=choices[0], label="task", elem_id="task")
                    photo = gr.Dropdown(["", *photos], value="", label="bundled photo", elem_id="photo",
                                        visible=bool(photos))
                with gr.Row():
                    image = gr.Image(type="filepath", image_mode=None, format="png", label="image", elem_id="image")
                    second = gr.Image(type="filepath", image_mode=None, format="png", elem_id="second_image",
                                      label="second image (embedding tasks: similarity)")
                text = gr.Textbox(label="text (question, phrase, caption or prompt)", elem_id="text")
                labels = gr.Textbox(label="labels / candidates (comma-separated)", elem_id="labels",
                                    placeholder=", ".join(bundled_class_names()))
                box = gr.Textbox(label="box x0 y0 x1 y1 (grounded captioning)", elem_id="box")
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                answer = gr.Textbox(label="answer", elem_id="answer", lines=3, interactive=False)
                drawn = gr.Image(type="pil", format="png", label="result image", elem_id="result_image",
                                 interactive=False)
                table = gr.Dataframe(headers=["label", "score"], label="details", elem_id="details", interactive=False)
                gallery = gr.Gallery(label="generated images", elem_id="gallery")
        photo.change(lambda name: load_photo(name) if name else None, photo, image)  # the photo into the input
        task.change(_labels_event(demo), [task, labels], labels)
        # preprocess=False: uploads reach `demo.run` as files, so an unreadable one fails in the library's
        # image loader with a message that names the file, not inside Gradio's own decoding
        button.click(_run_event(gr, demo), [task, image, text, labels, box, second],
                     [answer, drawn, table, gallery], api_name="run", preprocess=False)
    return app


def _labels_event(demo: Demo) -> Callable[[str, str], str]:
    """A task that requires a label list starts with the bundled photos' classes."""
    def fill(task: str, labels: str) -> str:
        needs_list = any(name in demo.task_of(task).required for name in LIST_OPTIONS)
        return ", ".join(bundled_class_names()) if needs_list and not labels.strip() else labels
    return fill


def _upload_path(payload: dict[str, Any] | None) -> str | None:
    """The server-side file of an image input's raw value (Gradio's `FileData` as a dict)."""
    return None if payload is None else payload.get("path")


def _run_event(gr: Any, demo: Demo) -> Callable[..., tuple]:
    """The Run button: a bad input becomes an error message on the page (and in the API's reply)."""
    def run(task: str, image: dict | None, text: str, labels: str, box: str, second: dict | None):
        try:
            answer = demo.run(task, _upload_path(image), text or "", labels or "", box or "", _upload_path(second))
        except BAD_INPUT as error:
            raise gr.Error(f"{type(error).__name__}: {error}", title="Bad input", print_exception=False) from error
        table = {"headers": answer.headers, "data": answer.rows} if answer.headers else None
        return answer.text, answer.image, table, answer.gallery
    return run
