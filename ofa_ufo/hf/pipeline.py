"""`pipeline("ofa-ufo")`: image + task (or free prompt) in, JSON-ready answer with scores out.

An ordinary transformers `Pipeline`, so that `batch_size`, `num_workers`, lists, generators and
datasets (`transformers.pipelines.pt_utils.KeyDataset`) go through transformers' own loop:

- `_sanitize_parameters` checks the call once, before any work (task or free prompt, task options,
  `text` / `prompt` types, prompt style, generation settings), and splits it between the stages;
- `preprocess` turns one input into model inputs with batch dimension 1 plus its `meta` (what the
  task needs to read the answer); with `batch_size` > 1 transformers pads `input_ids` (right, with
  `<pad>`) and `attention_mask` (0), concatenates `pixel_values` and `image_mask` and collects the
  metas in a list;
- `_forward` runs the task on the rows of the batch that hold no error and pairs every row's raw
  output with its meta, which transformers hands back one item at a time;
- `postprocess` turns one item's raw output into its JSON-ready result.

Errors: a mistake in the call itself always raises. A bad input (an unreadable image, no image
for a task that needs one, a non-string text) raises for a single input; in a list, a generator
or a dataset `preprocess` turns it into a placeholder row whose meta holds the message, `_forward`
skips it and `postprocess` returns `{"error": "..."}` in its place (`on_error="raise"` raises instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import GeneratorType
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import Pipeline

from ofa_ufo.core.images import load_image
from ofa_ufo.core.prompts import DEFAULT_STYLE, prompt_table
from ofa_ufo.hf.modeling import with_precision
from ofa_ufo.tasks import FREE_PROMPT, Task, get_task

_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_mask")
_POLICIES = ("raise", "record")  # on_error: raise at the first bad input, or give it an {"error"} record


def _check_text(value: Any, name: str) -> str | None:
    """A text argument is a string or None; anything else is a TypeError naming the argument."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string (or, for several inputs, a list with one string per input), "
                        f"got {type(value).__name__}: {value!r}")
    return value


def _with_text(item: Any, name: str, value: Any) -> dict[str, Any]:
    """One input paired with its own text, as a dict item."""
    return {**item, name: value} if isinstance(item, dict) else {"image": item, name: value}


class OFAUFOPipeline(Pipeline):
    """Prompted generation for every registered task.

    `pipe(image, task="caption")`, `pipe(image, task="vqa", text="what color is the car?")`,
    `pipe(image, prompt=" what is in the corner?")`, `pipe([img1, img2], task=..., batch_size=8)`,
    `pipe(KeyDataset(dataset, "image"), task=...)`. `image` is a path, a URL, a PIL image, an HxWxC
    uint8 array, or None for tasks without an image; an input may also be a dict
    `{"image": ..., "text": ...}` (`"prompt"` for a free prompt). Task options (`Task.options`, e.g.
    `labels`) go to the task; other keyword arguments go to `model.generate` (e.g. `num_beams`).
    `pipeline("ofa-ufo", model=DIR, device=0, dtype=torch.bfloat16)` places and casts the model as
    for any pipeline; `preprocess` casts the pixels to the model's dtype. `precision="auto"` picks bf16
    only where the device is fast at it (a CPU with AMX / AVX512-BF16, a CUDA GPU), fp32 elsewhere.
    """

    _load_processor = True
    _load_tokenizer = True
    _load_image_processor = True
    _load_feature_extractor = False

    def __init__(self, *args: Any, precision: str | None = None, **kwargs: Any) -> None:
        """As transformers' Pipeline; `precision="auto"` casts the model to bf16 where its device is fast at
        bf16 and keeps fp32 elsewhere (`ofa_ufo.core.hardware`), "fp32" / "bf16" as asked."""
        super().__init__(*args, **kwargs)
        if precision is not None:
            self.model = with_precision(self.model, precision)

    def __call__(self, inputs: Any, text: Any = None, prompt: Any = None, on_error: str | None = None,
                 **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """One input -> its result (a bad input raises). A list or tuple -> a list of results in input
        order; a generator, iterator or dataset -> an iterator of them; a bad input among several gives
        `{"error": "..."}` in its place unless `on_error="raise"`. `text` / `prompt` may be a list with
        one string per input (a list, tuple or generator of inputs)."""
        single = not isinstance(inputs, (list, tuple, Iterator, Dataset))
        for name, value in (("text", text), ("prompt", prompt)):
            if isinstance(value, (list, tuple)):
                inputs = self._zip_texts(inputs, single, name, value)
        if isinstance(inputs, tuple):
            inputs = list(inputs)  # transformers batches lists; a tuple would be taken as one input
        elif isinstance(inputs, Iterator) and not isinstance(inputs, GeneratorType):
            inputs = (item for item in inputs)  # transformers streams generators only
        if isinstance(inputs, list) and not inputs:
            return []
        policy = on_error or ("raise" if single else "record")
        return super().__call__(inputs, text=text, prompt=prompt, on_error=policy, **kwargs)

    @staticmethod
    def _zip_texts(inputs: Any, single: bool, name: str, values: list | tuple) -> list | Iterator:
        """Inputs paired with a per-input list of texts, as dict items."""
        if single:
            raise ValueError(f"{name}= is a list of {len(values)} but there is one input: pass a list of inputs")
        if isinstance(inputs, (list, tuple)):
            if len(values) != len(inputs):
                raise ValueError(f"got {len(values)} values for {name} but {len(inputs)} inputs")
            return [_with_text(item, name, value) for item, value in zip(inputs, values)]
        if isinstance(inputs, Iterator):
            return (_with_text(item, name, value) for item, value in zip(inputs, values, strict=True))
        raise ValueError(f"a list of {name} pairs with a list or a generator of inputs; for a dataset give each "
                         f"item its own text ({{'image': ..., '{name}': ...}})")

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        """Split a call's arguments between preprocess, forward and postprocess. Arguments given to
        `pipeline(...)` itself (a call always carries `on_error`, construction never does) are kept as
        every call's defaults, e.g. `pipeline("ofa-ufo", model=DIR, max_new_tokens=8)`."""
        if "on_error" not in kwargs:
            self._call_defaults = kwargs
            return {}, {}, {}
        return self._call_parameters(**{**getattr(self, "_call_defaults", {}), **kwargs})

    def _call_parameters(self, task: str | None = None, text: Any = None, prompt: Any = None,
                         style: str = DEFAULT_STYLE, on_error: str = "raise",
                         **kwargs: Any) -> tuple[dict, dict, dict]:
        """Check everything that holds for the whole call (an error here raises before any work)."""
        task_obj = self._resolve_task(task, text, prompt)
        name, shared = ("prompt", prompt) if task is None else ("text", text)
        shared = None if isinstance(shared, (list, tuple)) else _check_text(shared, name)  # a list is per input
        if on_error not in _POLICIES:
            raise ValueError(f"on_error must be one of {_POLICIES}, got {on_error!r}")
        prompt_table(style)  # an unknown style fails here, naming the styles there are
        options = {option: kwargs.pop(option) for option in task_obj.options if option in kwargs}
        task_obj.check_options(options)
        task_obj.check_generate_kwargs(kwargs)
        options["style"] = style  # for tasks that build further prompts (text_to_image's guidance)
        preprocess = dict(task=task_obj, text=shared, text_name=name, options=options, on_error=on_error)
        forward = dict(task=task_obj, options=options, generate_kwargs=kwargs)
        return preprocess, forward, dict(task=task_obj, options=options)

    @staticmethod
    def _resolve_task(task: str | None, text: Any, prompt: Any) -> Task:
        if task is None and prompt is None:
            raise ValueError("pass task='caption' (or another registered task) or a free prompt='...'")
        if task is not None and prompt is not None:
            raise ValueError("pass either task=... or prompt=..., not both")
        if task is None and text is not None:
            raise ValueError("a free prompt is all in prompt='...'; text=... is the input of a task")
        return get_task(FREE_PROMPT if task is None else task)

    def preprocess(self, item: Any, task: Task, text: str | None, text_name: str, options: dict[str, Any],
                   on_error: str) -> dict[str, Any]:
        """One input -> `input_ids`, `attention_mask` (1, L), `pixel_values` (1, 3, S, S), `image_mask` (1,)
        and its `meta`. A bad input raises (`on_error="raise"`) or becomes a placeholder row whose meta
        is `{"error": message}`, so that it still batches with the others."""
        try:
            image, item_text = self._unpack(item, text, text_name)
            image = self._load(image, task)
            meta = self._meta(image, item_text)
            prompt = task.request_prompt({**meta, "options": options}, options["style"])
        except (ValueError, TypeError) as error:  # ImageLoadError is a ValueError
            if on_error == "raise":
                raise
            return {**self._encode(None, ""), "meta": {"error": str(error)}}
        return {**self._encode(image, prompt), "meta": meta}

    @staticmethod
    def _unpack(item: Any, text: str | None, text_name: str) -> tuple[Any, str | None]:
        """(image, text) of one input: a dict item's own text wins over the call's."""
        if not isinstance(item, dict):
            return item, text
        unknown = sorted(set(item) - {"image", text_name})
        if unknown:
            raise ValueError(f"an input dict holds 'image' and {text_name!r}, got other keys {unknown}")
        return item.get("image"), _check_text(item.get(text_name, text), text_name)

    @staticmethod
    def _load(image: Any, task: Task) -> Image.Image | None:
        if image is not None:
            return load_image(image)
        if task.needs_image:
            raise ValueError(f"task {task.name!r} needs an input image: the `image` argument is None")
        return None

    def _meta(self, image: Image.Image | None, text: str | None) -> dict[str, Any]:
        """What a task needs to build the prompt and read the answer for one input (options aside)."""
        size = self.processor.image_processor.size
        input_size = (size, size) if isinstance(size, int) else (size["width"], size["height"])
        return dict(text=text, image=image, original_size=None if image is None else image.size,
                    input_size=input_size, box_codec=self.processor.box_codec)

    def _encode(self, image: Image.Image | None, prompt: str) -> dict[str, torch.Tensor]:
        batch = self.processor(images=[image], text=[prompt], return_tensors="pt")
        encoded = {key: batch[key] for key in _MODEL_INPUTS}
        encoded["pixel_values"] = encoded["pixel_values"].to(self.dtype)  # the model's dtype (torch_dtype=...)
        return encoded

    def _forward(self, batch: dict[str, Any], task: Task, options: dict[str, Any],
                 generate_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Collated inputs (or one item's, at batch_size 1) -> `{"outputs": (raw output, meta) per item}`;
        the task runs on the rows without an error, placeholder rows get None."""
        batched = isinstance(batch["meta"], list)
        metas = batch["meta"] if batched else [batch["meta"]]
        rows = [i for i, meta in enumerate(metas) if "error" not in meta]
        outputs: list[Any] = [None] * len(metas)
        if rows:
            raw = task.run(self.model, self._model_inputs(batch, rows, task), self.tokenizer, options, generate_kwargs)
            for i, output in zip(rows, raw):
                outputs[i] = output
        pairs = list(zip(outputs, metas))  # tuples: transformers unbatches lists by element, leaving them whole
        return {"outputs": pairs if batched else pairs[0]}

    def _model_inputs(self, batch: dict[str, Any], rows: list[int], task: Task) -> dict[str, torch.Tensor]:
        """The model's inputs for `rows` of the batch; text only when none of them has an image."""
        inputs = {key: batch[key][rows] for key in _MODEL_INPUTS}  # (R, ...)
        if not inputs["image_mask"].any():
            return {key: inputs[key] for key in ("input_ids", "attention_mask")}
        vision = self.model.config.vision_config
        if vision.supernet_layers:  # the supernet routes on the task
            inputs["task_ids"] = torch.full((len(rows),), vision.route_id(task.name), dtype=torch.long,
                                            device=inputs["input_ids"].device)
        return inputs

    def postprocess(self, model_outputs: dict[str, Any], task: Task, options: dict[str, Any]) -> dict[str, Any]:
        """One item's raw output -> its JSON-ready result, or `{"error": ...}` for a bad input."""
        raw, meta = model_outputs["outputs"]
        if "error" in meta:
            return {"error": meta["error"]}
        return task.postprocess(raw, self.tokenizer, {**meta, "options": options})
