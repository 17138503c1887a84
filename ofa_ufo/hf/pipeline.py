"""`pipeline("ofa-ufo")`: image + task (or free prompt) in, JSON-ready answer with scores out.

Inputs are batched by this pipeline itself (one padded processor call and one `generate` per
chunk of `batch_size`), so a bad image becomes an error record for that item while the rest of
the batch is answered.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

from ofa_ufo.core.images import ImageLoadError, load_image
from ofa_ufo.core.prompts import DEFAULT_STYLE
from ofa_ufo.tasks import FREE_PROMPT, Task, get_task


class OFAUFOPipeline(Pipeline):
    """Prompted generation for every registered task.

    `pipe(image, task="caption")`, `pipe(image, task="vqa", text="what color is the car?")`,
    `pipe(image, prompt=" what is in the corner?")`, `pipe([img1, img2], task=..., batch_size=8)`.
    `image` is a path, a PIL image, an HxWxC uint8 array, or None for text-only prompts.
    Extra keyword arguments go to `model.generate` (e.g. `num_beams`, `do_sample`).
    """

    _load_processor = True
    _load_tokenizer = True
    _load_image_processor = True
    _load_feature_extractor = False

    def _sanitize_parameters(self, **kwargs):
        return {}, {}, {}

    def __call__(
        self,
        inputs: Any,
        task: str | None = None,
        text: str | list[str] | None = None,
        prompt: str | list[str] | None = None,
        style: str = DEFAULT_STYLE,
        batch_size: int = 1,
        **kwargs: Any,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        single = not isinstance(inputs, (list, tuple))
        images = [inputs] if single else list(inputs)
        task_obj = self._resolve_task(task, prompt)
        options = {name: kwargs.pop(name) for name in task_obj.options if name in kwargs}
        task_obj.check_options(options)
        options["style"] = style  # the prompt style, for tasks that build further prompts (text_to_image's guidance)
        texts = self._per_item(prompt if task is None else text, len(images), "prompt" if task is None else "text")
        results: list[dict[str, Any] | None] = [None] * len(images)
        ready = []
        for i, (image, item_text) in enumerate(zip(images, texts)):
            try:
                loaded = None if image is None else load_image(image)
                meta = self._meta(loaded, item_text, options)
                ready.append((i, loaded, meta, task_obj.request_prompt(meta, style)))
            except (ImageLoadError, ValueError) as error:
                results[i] = {"error": str(error)}
        for start in range(0, len(ready), max(batch_size, 1)):
            chunk = ready[start : start + batch_size]
            for (i, *_), result in zip(chunk, self._run_chunk(task_obj, chunk, options, kwargs)):
                results[i] = result
        return results[0] if single else results

    @staticmethod
    def _resolve_task(task: str | None, prompt: Any) -> Task:
        if task is None and prompt is None:
            raise ValueError("pass task='caption' (or another registered task) or a free prompt='...'")
        if task is not None and prompt is not None:
            raise ValueError("pass either task=... or prompt=..., not both")
        return get_task(FREE_PROMPT if task is None else task)

    @staticmethod
    def _per_item(value: str | list[str] | None, count: int, name: str) -> list[str | None]:
        if value is None or isinstance(value, str):
            return [value] * count
        if len(value) != count:
            raise ValueError(f"got {len(value)} values for {name} but {count} inputs")
        return list(value)

    def _meta(self, image, text: str | None, options: dict[str, Any]) -> dict[str, Any]:
        """What a task needs to build the prompt and read the answer for one item."""
        size = self.processor.image_processor.size
        input_size = (size, size) if isinstance(size, int) else (size["width"], size["height"])
        return dict(text=text, image=image, original_size=None if image is None else image.size,
                    input_size=input_size, box_codec=self.processor.box_codec, options=options)

    def _run_chunk(self, task: Task, chunk: list[tuple], options: dict, generate_kwargs: dict) -> list[dict[str, Any]]:
        model_inputs = self.preprocess(chunk)
        vision = self.model.config.vision_config
        if "pixel_values" in model_inputs and vision.supernet_layers:
            ids = torch.full((len(chunk),), vision.route_id(task.name), dtype=torch.long, device=self.device)
            model_inputs["task_ids"] = ids  # the supernet routes on the task
        raw = self._forward(model_inputs, task=task, options=options, generate_kwargs=generate_kwargs)
        return self.postprocess(raw, task=task, metas=[meta for _, _, meta, _ in chunk])

    def preprocess(self, chunk: list[tuple]) -> dict[str, torch.Tensor]:
        """Items (index, image or None, meta, prompt) -> padded model inputs."""
        images = [image for _, image, _, _ in chunk]
        has_image = any(image is not None for image in images)
        batch = self.processor(images=images if has_image else None, text=[p for *_, p in chunk], return_tensors="pt")
        keys = ["input_ids", "attention_mask"] + (["pixel_values", "image_mask"] if has_image else [])
        return {k: batch[k].to(self.device) for k in keys}

    def _forward(self, model_inputs: dict[str, torch.Tensor], task: Task, options: dict, generate_kwargs: dict) -> list:
        return task.run(self.model, model_inputs, self.tokenizer, options, generate_kwargs)

    def postprocess(self, raw: list, task: Task, metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [task.postprocess(item, self.tokenizer, meta) for item, meta in zip(raw, metas)]
