"""`pipeline("ofa-ufo")`: image + task (or free prompt) in, JSON-ready answer with scores out.

Inputs are batched by this pipeline itself (one padded processor call and one `generate` per
chunk of `batch_size`), so a bad image becomes an error record for that item while the rest of
the batch is answered.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

from ofa_ufo.image_processing import ImageLoadError, load_image
from ofa_ufo.prompts import DEFAULT_STYLE
from ofa_ufo.tasks import FREE_PROMPT, Decoded, Task, get_task


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
        **generate_kwargs: Any,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        single = not isinstance(inputs, (list, tuple))
        images = [inputs] if single else list(inputs)
        task_obj = self._resolve_task(task, prompt)
        texts = self._per_item(prompt if task is None else text, len(images), "prompt" if task is None else "text")
        results: list[dict[str, Any] | None] = [None] * len(images)
        ready = []
        for i, (image, item_text) in enumerate(zip(images, texts)):
            try:
                loaded = None if image is None else load_image(image)
                ready.append((i, loaded, item_text, task_obj.prompt(item_text, style)))
            except (ImageLoadError, ValueError) as error:
                results[i] = {"error": str(error)}
        for start in range(0, len(ready), max(batch_size, 1)):
            chunk = ready[start : start + batch_size]
            for (i, *_), result in zip(chunk, self._run_chunk(task_obj, chunk, generate_kwargs)):
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

    def _run_chunk(self, task: Task, chunk: list[tuple], generate_kwargs: dict) -> list[dict[str, Any]]:
        model_inputs, metas = self.preprocess(chunk)
        outputs = self._forward(model_inputs, task=task, generate_kwargs=generate_kwargs)
        return self.postprocess(outputs, task=task, metas=metas)

    def preprocess(self, chunk: list[tuple]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """Items (index, image or None, text, prompt) -> padded model inputs and per-item metadata."""
        images = [image for _, image, _, _ in chunk]
        has_image = any(image is not None for image in images)
        batch = self.processor(
            images=images if has_image else None, text=[p for *_, p in chunk], return_tensors="pt"
        )
        size = self.processor.image_processor.size
        input_size = (size, size) if isinstance(size, int) else (size["width"], size["height"])
        metas = [
            dict(text=text, original_size=tuple(batch["original_sizes"][j].tolist()) if has_image else None,
                 input_size=input_size, box_codec=self.processor.box_codec)
            for j, (_, _, text, _) in enumerate(chunk)
        ]
        keys = ["input_ids", "attention_mask"] + (["pixel_values", "image_mask"] if has_image else [])
        return {k: batch[k].to(self.device) for k in keys}, metas

    def _forward(self, model_inputs: dict[str, torch.Tensor], task: Task, generate_kwargs: dict) -> dict[str, Any]:
        kwargs = {**task.generate_kwargs(self.model.config, self.tokenizer), **generate_kwargs}
        kwargs.update(output_scores=True, return_dict_in_generate=True)
        with torch.inference_mode():
            out = self.model.generate(**model_inputs, **kwargs)
        beams = kwargs.get("num_beams", 1) > 1
        scores = self.model.compute_transition_scores(
            out.sequences, out.scores, out.beam_indices if beams else None, normalize_logits=not beams
        )  # (rows, new_tokens)
        return {"sequences": out.sequences, "transition_scores": scores, "per_input": kwargs.get("num_return_sequences", 1)}

    def postprocess(self, outputs: dict[str, Any], task: Task, metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        decoded = [self._decoded(row, scores) for row, scores in zip(outputs["sequences"], outputs["transition_scores"])]
        per_input = outputs["per_input"]
        results = []
        for j, meta in enumerate(metas):
            answers = [task.postprocess(d, self.tokenizer, meta) for d in decoded[j * per_input : (j + 1) * per_input]]
            results.append(answers[0] if per_input == 1 else {"candidates": answers})
        return results

    def _decoded(self, sequence: torch.Tensor, scores: torch.Tensor) -> Decoded:
        """Strip the start token, cut after </s>, and sum the log-probabilities of the kept tokens."""
        tokens = sequence[1:].tolist()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        logprob = float(scores[:length].sum())
        kept = [t for t in tokens[:length] if t not in (eos, pad)]
        return Decoded(tokens=kept, logprob=logprob)
