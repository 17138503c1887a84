"""Tasks whose inputs or outputs are boxes: grounding (zero, one or several boxes), grounded
captioning (a region in the prompt) and detection (boxes, labels and per-box scores)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ofa_ufo.core.prompts import DEFAULT_STYLE, format_prompt
from ofa_ufo.generation import Trie
from ofa_ufo.generation.constraints import BoxSequenceLogitsProcessor, DetectionLogitsProcessor
from ofa_ufo.generation.scoring import Decoded
from ofa_ufo.tasks.base import AuxiliaryLoss, Task
from ofa_ufo.tasks.box_mask import box_mask_loss

NO_OBJECT = " none"  # grounding target when the phrase matches nothing


def _box_text(codec, boxes, meta: dict[str, Any]) -> str:
    bins = codec.encode(boxes, meta["original_size"], meta["input_size"])
    return " ".join(codec.to_text(bins[i]) for i in range(len(bins)))


def _decode_boxes(tokens: list[int], tokenizer, meta: dict[str, Any]) -> list[list[float]]:
    codec = meta["box_codec"]
    bins = codec.from_token_ids(np.asarray(tokens, dtype=np.int64).reshape(-1, 4), tokenizer.bin_offset)  # (N, 4)
    return [[round(float(v), 2) for v in box] for box in codec.decode(bins, meta["original_size"], meta["input_size"])]


def _has_area(box: list[float]) -> bool:
    """Positive width and height. The decoding constraints order the bins, but corners can still meet
    after clipping (OFA mode beyond `max_image_size`) or rounding to 0.01 px on a tiny image."""
    return box[2] > box[0] and box[3] > box[1]


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def _suppress(found: list[tuple], threshold: float) -> list[tuple]:
    """Class-aware NMS over (box, label, score, ...) tuples: going down the scores, an item is dropped
    when a kept one of the same label overlaps it with IoU > `threshold`; the kept keep their order."""
    kept: list[int] = []
    for i in sorted(range(len(found)), key=lambda i: -found[i][2]):
        if not any(found[k][1] == found[i][1] and _iou(found[k][0], found[i][0]) > threshold for k in kept):
            kept.append(i)
    return [found[i] for i in sorted(kept)]


def _nms_iou(task: Task, options: dict[str, Any]) -> float:
    """The call's `nms_iou` option, else the task's default."""
    value = options.get("nms_iou")
    return task.nms_iou if value is None else float(value)


def check_fraction(options: Mapping[str, Any], name: str) -> None:
    """TypeError for an option (`nms_iou`, a score threshold) that is no number, ValueError for one outside [0, 1]."""
    value = options.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in the range [0, 1], got {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in the range [0, 1], got {value!r}")


@dataclass
class GroundingTask(Task):
    """Referring expression -> boxes. The target is one or more 4-bin groups, or " none".

    Options: `max_boxes` (default 1, as OFA's RefCOCO), `allow_none` (default True; False gives
    OFA's always-a-box behaviour for converted checkpoints), `nms_iou` (default 0.7: a box that
    overlaps a better-scored one with IoU above it repeats it and is dropped; 1.0 keeps all). Each
    box is scored by the probability of its four bin tokens; boxes keep the order generated.
    Training may add the box-mask loss on the image tokens (`box_mask_weight`, `ofa_ufo.tasks.box_mask`).
    """

    options: tuple[str, ...] = ("max_boxes", "allow_none", "nms_iou")
    auxiliary: AuxiliaryLoss | None = AuxiliaryLoss("box-mask", "box_mask_weight", "box_head")
    nms_iou: float = 0.7

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        check_fraction(options, "nms_iou")

    def prompt(self, text: str | None = None, style: str = DEFAULT_STYLE) -> str:
        if not text or not text.strip():
            raise ValueError("task 'grounding' needs the phrase to find: pass text='...'")
        return super().prompt(text, style)

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        """Target: the bins of every matching box (`box` or `boxes`), or " none" when there is none."""
        boxes = example.get("boxes")
        if boxes is None:
            boxes = [example["box"]] if example.get("box") is not None else []
        target = _box_text(meta["box_codec"], boxes, meta) if len(boxes) else NO_OBJECT
        return self.prompt(example["text"], style), target

    def generate_kwargs(self, config, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        max_boxes = int(options.get("max_boxes") or 1)
        none_ids = tokenizer(NO_OBJECT, add_special_tokens=False)["input_ids"]
        none_id = none_ids[0] if options.get("allow_none", True) and len(none_ids) == 1 else None
        constraint = BoxSequenceLogitsProcessor(
            config.bin_offset, config.bin_offset + config.num_bins, tokenizer.eos_token_id, max_boxes, none_id
        )
        return {**self.generation, "max_new_tokens": 4 * max_boxes + 1, "logits_processor": [constraint]}

    def metric_pair(self, result: dict[str, Any], example: dict[str, Any]) -> tuple[Any, Any]:
        """Every predicted box against every annotated one (`box`, or `boxes`, possibly none): the box
        set metrics of `ofa_ufo.metrics.grounding`."""
        reference = [example["box"]] if example.get("box") is not None else list(example.get("boxes") or [])
        return list(result.get("boxes") or []), reference

    def answer(self, decoded: Decoded, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        count = len(decoded.tokens) // 4 * 4
        bins = [t for t in decoded.tokens[:count] if tokenizer.bin_offset <= t < tokenizer.bin_offset + tokenizer.num_bins]
        if len(bins) != count:  # " none" (or nothing usable): no object
            return {"boxes": [], "labels": [], "scores": []}
        scores = [float(np.exp(sum(decoded.token_logprobs[i : i + 4]))) for i in range(0, count, 4)]
        found = [(box, meta["text"], score) for box, score in zip(_decode_boxes(bins, tokenizer, meta), scores)
                 if _has_area(box)]
        kept = _suppress(found, _nms_iou(self, meta.get("options") or {}))
        return {"boxes": [f[0] for f in kept], "labels": [f[1] for f in kept], "scores": [f[2] for f in kept]}

    def auxiliary_head(self, dim: int) -> torch.nn.Module:
        """One logit per image token: how much of its cell the referred box(es) cover."""
        return torch.nn.Linear(dim, 1)

    def auxiliary_loss(self, head: torch.nn.Module, encoder_states: torch.Tensor, pixel_values: torch.Tensor | None,
                       examples: Sequence[dict[str, Any]]) -> torch.Tensor:
        """The box-mask loss over this task's rows that have an image."""
        rows = [i for i, e in enumerate(examples) if e["task"] == self.name and e.get("image_size")]
        return box_mask_loss(head, encoder_states, pixel_values, examples, rows)


@dataclass
class GroundedCaptionTask(Task):
    """Describe a region given as `box=[x0, y0, x1, y1]` (original pixels), written into the prompt as bins."""

    options: tuple[str, ...] = ("box",)
    headline: str = "cider"
    required: dict[str, str] = field(default_factory=lambda: {"box": "[10, 20, 110, 90]"})

    def request_prompt(self, meta: dict[str, Any], style: str = DEFAULT_STYLE) -> str:
        self.check_options(meta["options"])
        box = meta["options"]["box"]
        if meta["original_size"] is None:
            raise ValueError("task 'grounded_caption' needs an image")
        return format_prompt(self.name, style, region=_box_text(meta["box_codec"], [box], meta))

    def pipeline_call(self, example: dict[str, Any], labels: list[str] | None = None) -> dict[str, Any]:
        return {"box": example["box"]}

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        prompt = self.request_prompt({**meta, "options": {"box": example["box"]}}, style)
        return prompt, " " + self.normalize(example["target"])


@dataclass
class DetectionTask(Task):
    """Detection as generation (Pix2Seq / OFA): `<bin>x4 label ...`; each box is scored by the
    probability of its label tokens. Class-aware non-maximum suppression: going down the scores, a
    box is dropped when a kept box of the same label overlaps it with IoU > `nms_iou` (a generated
    sequence often repeats an object). Boxes without area and objects with an empty label are dropped.

    Options: `labels` (restrict labels to a class list via a trie), `nms_iou` (default 0.7; 1.0 keeps
    every box), `max_new_tokens` via generate.
    """

    options: tuple[str, ...] = ("labels", "nms_iou")
    headline: str = "map50"
    nms_iou: float = 0.7

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        check_fraction(options, "nms_iou")

    def build_example(self, example: dict[str, Any], meta: dict[str, Any], style: str = DEFAULT_STYLE) -> tuple[str, str]:
        parts = [f"{_box_text(meta['box_codec'], [box], meta)} {self.normalize(label)}"
                 for box, label in zip(example["boxes"], example["labels"])]
        return self.prompt(None, style), " ".join(parts)

    def pipeline_call(self, example: dict[str, Any], labels: list[str] | None = None) -> dict[str, Any]:
        return {"labels": labels} if labels else {}

    def metric_pair(self, result: dict[str, Any], example: dict[str, Any]) -> tuple[Any, Any]:
        prediction = {k: result.get(k, []) for k in ("boxes", "labels", "scores")}
        return prediction, {"boxes": example["boxes"], "labels": example["labels"]}

    def generate_kwargs(self, config, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        labels = options.get("labels")
        trie = None if labels is None else Trie.from_strings(tokenizer, [" " + self.normalize(l) for l in labels])
        specials = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
                    tokenizer.unk_token_id, tokenizer.mask_token_id]
        constraint = DetectionLogitsProcessor(config.bin_offset, config.bin_offset + config.num_bins,
                                              tokenizer.eos_token_id, config.code_offset, specials, trie)
        return {**self.generation, "logits_processor": [constraint]}

    def answer(self, decoded: Decoded, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        options = meta.get("options") or {}
        written = {self.normalize(name): name for name in reversed(options.get("labels") or [])}  # caller's spelling
        found = []
        for box_tokens, label_tokens, label_logprobs in self._objects(decoded, tokenizer):
            label = tokenizer.decode(label_tokens, skip_special_tokens=True).strip()
            box = _decode_boxes(box_tokens, tokenizer, meta)[0]
            if label and _has_area(box):
                found.append((box, written.get(label, label), float(np.exp(sum(label_logprobs)))))
        kept = _suppress(sorted(found, key=lambda f: -f[2]), _nms_iou(self, options))
        return {"boxes": [f[0] for f in kept], "labels": [f[1] for f in kept], "scores": [f[2] for f in kept]}

    @staticmethod
    def _objects(decoded: Decoded, tokenizer):
        """Split a token sequence into (4 bin tokens, label tokens, label log-probs); incomplete objects dropped."""
        low, high = tokenizer.bin_offset, tokenizer.bin_offset + tokenizer.num_bins
        objects, box, label, logprobs = [], [], [], []
        for token, logprob in zip(decoded.tokens, decoded.token_logprobs):
            if low <= token < high:
                if len(box) == 4 and label:
                    objects.append((box, label, logprobs))
                    box, label, logprobs = [], [], []
                box.append(token)
            elif len(box) == 4:
                label.append(token)
                logprobs.append(logprob)
        if len(box) == 4 and label:
            objects.append((box, label, logprobs))
        return objects
