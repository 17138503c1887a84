"""Embedding tasks (UFO AllInOne): person / vehicle re-identification, face recognition, product
retrieval. The answer is a vector, not text: `{"embedding": [floats]}`.

Read-out (`OFAUFOModel.embed`): the encoder reads the image and the task's prompt, routed by the
task id in a UFO supernet; the decoder runs one step on the start token; its final state
(dimension d_model) is the embedding, L2-normalised. Retrieval compares embeddings by cosine
similarity (`ofa_ufo.metrics.retrieval`).

Training (`ofa_ufo.training`): the same read-out of the raw (un-normalised) state feeds a CosFace
head over the task's training identities plus, for the ReID-like tasks, a soft-margin batch-hard
triplet loss on P x K batches (K = 4), with AllInOne's per-task scale / margin.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ofa_ufo.core.prompts import DEFAULT_STYLE
from ofa_ufo.layers.metric_learning import CosFaceHead, batch_hard_triplet_loss
from ofa_ufo.tasks.base import Task
from ofa_ufo.tasks.identities import IDENTITIES_FILE, load_identities
from ofa_ufo.tasks.pk_sampler import PKSource

__all__ = ["EmbeddingTask", "identities_of", "identity_of"]


def identity_of(example: dict[str, Any]) -> Hashable:
    """An example's training identity: ``(meta["dataset"], meta["identity"])``, so identities of
    merged datasets never collide (as AllInOne's dataset-name prefixes)."""
    meta = example.get("meta") or {}
    if "identity" not in meta:
        raise ValueError(f"example {example.get('id')!r} of task {example.get('task')!r} has no meta['identity'] "
                         "(see ofa_ufo.data.loaders.reid)")
    return meta.get("dataset"), meta["identity"]


def identities_of(examples: Sequence[dict[str, Any]]) -> list[Hashable]:
    """`identity_of` every example; a collection that lists them itself (`.identities`, e.g. the lazily
    rendered `ofa_ufo.data.demo_identities.DemoIdentities`) is not iterated (nothing is rendered)."""
    listed = getattr(examples, "identities", None)
    return list(listed) if listed is not None else [identity_of(e) for e in examples]


@dataclass
class EmbeddingTask(Task):
    """Image -> L2-normalised embedding; generation does not apply (a generate option is an error).

    `cosface_scale` / `cosface_margin`: CosFace s and m; `triplet_weight`: weight of the batch-hard
    triplet loss (0: CosFace only, as face); `triplet_margin`: 0 = soft margin (AllInOne), > 0 = hinge;
    `instances_per_identity`: K of P x K sampling in training (0: plain shuffled draws, as face).
    """

    metric: str = "reid"
    options: tuple[str, ...] = ("identify",)
    demo_data: str = "identities"  # demo runs train on generated identities, not scenes
    identity_kind: str = ""  # what it tells apart: person, vehicle, face, product (ofa_ufo.data.demo_identities)
    cosface_scale: float = 30.0
    cosface_margin: float = 0.2
    triplet_weight: float = 1.0
    triplet_margin: float = 0.0
    instances_per_identity: int = 4

    # ---- inference ------------------------------------------------------------------------

    def request_prompt(self, meta: dict[str, Any], style: str = DEFAULT_STYLE) -> str:
        if meta.get("original_size") is None:
            raise ValueError(f"task {self.name!r} embeds an image: pass one")
        if meta.get("text"):
            raise ValueError(f"task {self.name!r} takes no text (its prompt is fixed); got text={meta['text']!r}")
        return self.prompt(None, style)

    def generate_kwargs(self, config, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"task {self.name!r} returns an embedding, not text: it has no text generation "
                         "(use a text task, or prompt='...' for free text)")

    def run(self, model, inputs: dict, tokenizer, options: dict[str, Any], generate_kwargs: dict[str, Any]) -> list:
        """Per input: (normalised embedding (D,), closed-set candidates or None).

        `identify=True` (or k) also names the training identity, with the classes the trainer exported
        next to the model (`ofa_ufo.tasks.identities`); the top k candidates come with their
        probabilities."""
        if generate_kwargs:
            raise ValueError(f"task {self.name!r} returns an embedding, not text: generation option(s) "
                             f"{sorted(generate_kwargs)} do not apply")
        top_k = self._identify_k(options.get("identify"))
        classifier = self._classifier(model) if top_k else None
        with torch.inference_mode():
            raw = model.embed(inputs.get("pixel_values"), inputs["input_ids"], inputs.get("attention_mask"),
                              inputs.get("task_ids"), inputs.get("image_mask"), normalize=False)  # (B, D)
        features = torch.nn.functional.normalize(raw.float(), dim=-1).cpu()
        candidates = classifier.classify(raw, top_k) if classifier is not None else [None] * len(features)
        return list(zip(features, candidates))

    def postprocess(self, raw: tuple, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
        embedding, candidates = raw
        out = {"embedding": embedding.tolist()}
        if candidates:
            out["identity"], out["score"] = candidates[0]
            if len(candidates) > 1:
                out["candidates"] = [{"identity": name, "score": p} for name, p in candidates]
        return out

    def _identify_k(self, value: Any) -> int:
        if value is None or value is False:
            return 0
        if value is True:
            return 1
        if isinstance(value, int) and value > 0:
            return value
        raise ValueError(f"identify must be True or a positive number of candidates, got {value!r}")

    def _classifier(self, model):
        directory = str(getattr(model, "name_or_path", "") or "")
        classifiers = load_identities(directory) if directory else {}
        if self.name not in classifiers:
            raise ValueError(
                f"identify=True needs the closed set of identities task {self.name!r} was trained on: "
                f"{IDENTITIES_FILE} next to the model (written by the trainer's export for every embedding task "
                f"it trained; model directory: {directory or 'unknown'}"
                + (f", which has {sorted(classifiers)}" if classifiers else "") + ")"
            )
        return classifiers[self.name]

    def pipeline_call(self, example: dict[str, Any], labels: list[str] | None = None) -> dict[str, Any]:
        return {}

    def metric_pair(self, result: dict[str, Any], example: dict[str, Any]) -> tuple[Any, Any]:
        """(embedding, the example's meta): the retrieval metrics read identity / camera / split or pair."""
        return result.get("embedding"), example.get("meta") or {}

    # ---- training hooks -------------------------------------------------------------------

    def build_example(self, example: dict[str, Any], meta: dict[str, Any],
                      style: str = DEFAULT_STYLE) -> tuple[str, None]:
        """(prompt, None): no token target; the example trains through `head_loss`."""
        return self.prompt(None, style), None

    def training_source(self, source, seed: int, options: Mapping[str, Any]):
        """P x K identity chunks (K = `instances_per_identity`) over the source's examples."""
        if not self.instances_per_identity:
            return source
        if not hasattr(source, "examples"):
            raise ValueError(f"task {self.name!r} trains on identity-labelled data, not demo scenes: set "
                             f"data={{{self.name}: FILE.jsonl or a spec}} (see docs/retrieval.md)")
        identities = identities_of(source.examples)
        return PKSource(self.name, source.examples, identities, self.instances_per_identity, seed)

    def training_head(self, examples: Sequence[dict[str, Any]], dim: int):
        """A CosFace head whose class-weight matrix has one row per training identity."""
        classes = sorted(set(identities_of(examples)), key=repr)
        return CosFaceHead(classes, dim, self.cosface_scale, self.cosface_margin)

    def head_loss(self, head, features: torch.Tensor, examples: Sequence[dict[str, Any]]) -> torch.Tensor:
        """CosFace over the head's identities + `triplet_weight` x batch-hard triplet, on raw (B, D) read-outs."""
        labels = head.labels([identity_of(e) for e in examples]).to(features.device)
        loss = head(features, labels)
        if self.triplet_weight:
            loss = loss + self.triplet_weight * batch_hard_triplet_loss(features, labels, self.triplet_margin)
        return loss
