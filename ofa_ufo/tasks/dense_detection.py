"""Dense detection (DAMO-YOLO): every box in one forward pass of the model's dense head, beside
`detection` (boxes as generated tokens). Same example fields and the same result schema
(`{"boxes", "labels", "scores"}`, boxes in original-image pixels), same metric (COCO mAP).

The model needs a dense head (`OFAUFOConfig.dense_head`, `ofa_ufo.models.damo_yolo`): its class list is
the label vocabulary. The task has no token target; it trains through `model_outputs` (quality focal +
distribution focal + GIoU after AlignedOTA assignment), which the trainer adds for its rows of a
heterogeneous batch, weighted by the training config's `dense_loss_weight`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ofa_ufo.core.prompts import DEFAULT_STYLE
from ofa_ufo.tasks.base import Task
from ofa_ufo.tasks.localization import check_fraction

__all__ = ["DenseDetectionTask", "dense_labels"]

DENSE_HEAD_HINT = ("create one with ofa_ufo.create_model(..., dense_head={'preset': 'tiny', 'labels': [...]}) "
                   "or train task dense_detection (docs/dense_detection.md)")


def dense_labels(model) -> list[str]:
    """The class names of `model`'s dense head; a clear error for a model without one."""
    config = getattr(model, "config", None)
    head = getattr(config, "dense_head", None)
    if not head:
        raise ValueError(f"task 'dense_detection' needs a model with a dense head, and this one has none: "
                         f"{DENSE_HEAD_HINT}")
    return list(head["labels"])


def _scaled_boxes(boxes: torch.Tensor, source: Sequence[float], target: Sequence[float]) -> torch.Tensor:
    """Boxes (N, 4) xyxy from an image of size `source` (w, h) to one of size `target` (the processor's
    resize is square and ignores the aspect ratio, so x and y scale apart)."""
    scale = boxes.new_tensor([target[0] / source[0], target[1] / source[1]] * 2)  # (4,)
    return boxes * scale


@dataclass
class DenseDetectionTask(Task):
    """Image -> boxes, labels and scores from the dense head; no text generation.

    Options: `score_threshold` (default 0.05), `nms_iou` (class-aware NMS, default 0.6), `max_detections`
    (default 100), `labels` (report only these of the head's classes).
    """

    metric: str = "coco_map"
    headline: str = "map50"
    options: tuple[str, ...] = ("labels", "score_threshold", "nms_iou", "max_detections")
    source_options: tuple[str, ...] = ("dense_head",)
    model_loss_weight: str = "dense_loss_weight"
    score_threshold: float = 0.05
    nms_iou: float = 0.6
    max_detections: int = 100

    # ---- inference ------------------------------------------------------------------------

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        for name in ("score_threshold", "nms_iou"):
            check_fraction(options, name)
        count = options.get("max_detections")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"max_detections must be a positive integer, got {count!r}")
        labels = options.get("labels")
        if labels is not None and (isinstance(labels, str) or not all(isinstance(l, str) for l in labels)):
            raise TypeError(f"labels must be a list of class names, got {labels!r}")

    def check_generate_kwargs(self, generate_kwargs: Mapping[str, Any]) -> None:
        if generate_kwargs:
            raise ValueError(f"task {self.name!r} detects in one forward pass: generation option(s) "
                             f"{sorted(generate_kwargs)} do not apply (its options: {', '.join(self.options)})")

    def request_prompt(self, meta: dict[str, Any], style: str = DEFAULT_STYLE) -> str:
        if meta.get("original_size") is None:
            raise ValueError(f"task {self.name!r} needs an input image")
        return self.prompt(None, style)

    def generate_kwargs(self, config, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"task {self.name!r} detects in one forward pass: it has no text generation")

    def run(self, model, inputs: dict, tokenizer, options: dict[str, Any], generate_kwargs: dict[str, Any]) -> list:
        """Per input: its detections in model-input pixels (boxes (K, 4), scores (K,), label names)."""
        self.check_generate_kwargs(generate_kwargs)
        names = dense_labels(model)
        keep = self._kept_classes(names, options.get("labels"))
        with torch.inference_mode():
            output = model.detect_dense(inputs["pixel_values"], inputs.get("task_ids"))
            found = model.dense_head.postprocess(
                output, score_threshold=self._option(options, "score_threshold"),
                iou_threshold=self._option(options, "nms_iou"), max_detections=self._option(options, "max_detections"),
                input_size=tuple(inputs["pixel_values"].shape[-2:]))
        return [self._named(detections, names, keep) for detections in found]

    def _option(self, options: Mapping[str, Any], name: str) -> Any:
        value = options.get(name)
        return getattr(self, name) if value is None else value

    @staticmethod
    def _kept_classes(names: list[str], wanted: Sequence[str] | None) -> set[int] | None:
        """Indices of the head's classes a `labels` option keeps (None: all)."""
        if wanted is None:
            return None
        if len(wanted) > len(names):
            raise ValueError(f"labels lists {len(wanted)} classes but the dense head was trained for {len(names)} "
                             f"({', '.join(names)})")
        unknown = [label for label in wanted if label not in names]
        if unknown:
            raise ValueError(f"labels {unknown} are not classes of the dense head; its classes: {', '.join(names)}")
        return {names.index(label) for label in wanted}

    @staticmethod
    def _named(detections: dict[str, torch.Tensor], names: list[str], keep: set[int] | None) -> dict[str, Any]:
        labels = detections["labels"].tolist()
        rows = [i for i, label in enumerate(labels) if keep is None or label in keep]
        return {"boxes": detections["boxes"][rows].float().cpu(), "scores": detections["scores"][rows].float().cpu(),
                "labels": [names[labels[i]] for i in rows]}

    def postprocess(self, raw: dict[str, Any], tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        """Boxes from model-input to original pixels (clipped, 0.01 px), best score first, as the generative
        detector gives them; a box without area after rounding is dropped, as there."""
        width, height = meta["original_size"]
        boxes = _scaled_boxes(raw["boxes"], meta["input_size"], meta["original_size"])
        boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                             boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)  # (K, 4)
        found = [([round(float(v), 2) for v in box], label, float(score))
                 for box, label, score in zip(boxes, raw["labels"], raw["scores"])]
        kept = sorted((f for f in found if f[0][2] > f[0][0] and f[0][3] > f[0][1]), key=lambda f: -f[2])
        return {"boxes": [f[0] for f in kept], "labels": [f[1] for f in kept], "scores": [f[2] for f in kept]}

    def pipeline_call(self, example: dict[str, Any], labels: list[str] | None = None) -> dict[str, Any]:
        return {}

    def metric_pair(self, result: dict[str, Any], example: dict[str, Any]) -> tuple[Any, Any]:
        prediction = {k: result.get(k, []) for k in ("boxes", "labels", "scores")}
        return prediction, {"boxes": example["boxes"], "labels": example["labels"]}

    # ---- training hooks -------------------------------------------------------------------

    def build_example(self, example: dict[str, Any], meta: dict[str, Any],
                      style: str = DEFAULT_STYLE) -> tuple[str, None]:
        """(prompt, None): no token target; the example trains through `model_outputs`."""
        return self.prompt(None, style), None

    def model_head(self, class_names: Sequence[str] | None, options: Mapping[str, Any]) -> dict[str, Any]:
        """The `dense_head` model config entry a run needs: the config's preset over the data's classes. None
        (streamed data, whose classes are not known ahead): nothing; the model must bring its head
        (`model_overrides: {dense_head: ...}` or a model directory that has one)."""
        if class_names is None:
            return {}
        if not class_names:
            raise ValueError("task 'dense_detection' found no class labels in its training data")
        return {"dense_head": {"preset": options.get("dense_head") or "small", "labels": list(class_names)}}

    def model_outputs(self, model, batch: dict[str, torch.Tensor],
                      examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The dense head's loss dict (mean loss over `examples`, this task's rows of a batch with their
        `image_size`) and neck features, through the (possibly DDP-wrapped) model's forward."""
        names = dense_labels(getattr(model, "module", model))
        side = batch["pixel_values"].shape[-1]
        targets = [self.dense_target(example, names, (side, side), batch["pixel_values"].device)
                   for example in examples]
        return model(pixel_values=batch["pixel_values"], task_ids=batch.get("task_ids"), dense_targets=targets)

    @staticmethod
    def dense_target(example: Mapping[str, Any], names: Sequence[str], input_size: Sequence[int],
                     device: torch.device) -> dict[str, torch.Tensor]:
        """One example's boxes (original pixels) and labels as the dense head's target in model-input pixels."""
        unknown = sorted(set(example["labels"]) - set(names))
        if unknown:
            raise ValueError(f"example {example.get('id')!r} has labels {unknown} that the dense head does not know; "
                             f"its classes: {', '.join(names)}")
        boxes = torch.tensor(example["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)  # (N, 4)
        labels = torch.tensor([names.index(label) for label in example["labels"]], dtype=torch.long, device=device)
        return {"boxes": _scaled_boxes(boxes, example["image_size"], input_size), "labels": labels}
