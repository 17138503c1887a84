"""Evaluation metrics computed with the standard reference code, behind a name registry.

``get_metric(name)`` returns a callable ``metric(predictions, references) -> dict[str, float]``;
task specs name their metric (``metric: cider``) and the evaluation loop looks it up here.

=================  ======================================  ======================================
name               predictions / references                returned keys
=================  ======================================  ======================================
``caption``        ``list[str]`` / ``list[list[str]]``     ``bleu4 meteor rouge_l cider``
``bleu4`` ...      same (one caption metric each)          its own name
``vqa_accuracy``   ``list[str]`` / ``list[list[str]]``     ``vqa_accuracy`` (10 human answers)
``acc@0.5``        box sets [#box]_ / box sets             ``acc@0.5`` (one-to-one at IoU >= 0.5)
``grounding``      same                                    ``acc@0.5 none_precision none_recall
                                                           none_f1`` ("none": no object)
``top1``/``top5``  ranked labels ``list[list[label]]`` /   ``top1`` / ``top5``
                   gold ``list[label]``
``coco_map``       ``[{"boxes","labels","scores"}]`` /     ``map`` (mAP@[.5:.95]), ``map50``
                   ``[{"boxes","labels"}]`` per image
``reid``           embeddings [#emb]_ / ``[{identity,      ``rank1 rank5 rank10 mAP mINP``,
                   camera, split}]``, split ``query`` or   ``valid_queries skipped_queries``
                   ``gallery`` (Market-1501 protocol)
``verification``   embeddings / ``[{pair, side, same       ``accuracy accuracy_std threshold``
                   [, fold]}]``, sides 0 and 1 of each     (10-fold LFW protocol)
                   pair
``recall@k``       embeddings / ``[{identity}]`` or bare   ``recall@1 recall@10 recall@100``
                   labels                                  (SOP: each item queries the rest)
``psnr``           generated / reference images (PIL,      ``psnr`` (dB, mean over pairs)
                   paths or arrays)
=================  ======================================  ======================================

.. [#box] Per example one box ``[x0,y0,x1,y1]``, a list of boxes, or ``[]`` / ``None`` for no object;
   see :mod:`ofa_ufo.metrics.grounding` for the matching rule.
.. [#emb] One embedding per image: ``list[float]`` or the pipeline's ``{"embedding": [...]}``;
   the references are the examples' ``meta`` dicts (see ``ofa_ufo.data.loaders.reid``) and
   the distance is cosine. See :mod:`ofa_ufo.metrics.retrieval` for the protocols.

All values are fractions in [0, 1] except CIDEr (0-10 scale), PSNR (dB), the verification ``threshold``
(a cosine similarity) and the ReID query counts. SPICE is not offered (it needs a
model download); see ``captioning`` for the Java cost of METEOR and the tokeniser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from ofa_ufo.metrics.captioning import CAPTION_METRICS, caption_scores
from ofa_ufo.metrics.classification import topk_accuracy
from ofa_ufo.metrics.detection import coco_map
from ofa_ufo.metrics.grounding import box_iou, grounding_accuracy, grounding_scores
from ofa_ufo.metrics.image import psnr
from ofa_ufo.metrics.retrieval import (
    recall_at_k, recall_metric, reid_metric, reid_metrics, verification_accuracy, verification_metric,
)
from ofa_ufo.metrics.vqa import normalize_vqa_answer, vqa_accuracy, vqa_score

__all__ = [
    "CAPTION_METRICS",
    "Metric",
    "box_iou",
    "caption_scores",
    "coco_map",
    "get_metric",
    "grounding_accuracy",
    "grounding_scores",
    "list_metrics",
    "normalize_vqa_answer",
    "psnr",
    "recall_at_k",
    "reid_metrics",
    "topk_accuracy",
    "verification_accuracy",
    "vqa_accuracy",
    "vqa_score",
]

Metric = Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]

_METRICS: dict[str, Metric] = {
    "caption": caption_scores,
    **{name: partial(caption_scores, metrics=(name,)) for name in CAPTION_METRICS},
    "vqa_accuracy": vqa_accuracy,
    "acc@0.5": partial(grounding_accuracy, threshold=0.5),
    "grounding": partial(grounding_scores, threshold=0.5),
    "top1": partial(topk_accuracy, k=1),
    "top5": partial(topk_accuracy, k=5),
    "coco_map": coco_map,
    "reid": reid_metric,
    "verification": verification_metric,
    "recall@k": recall_metric,
    "psnr": psnr,
}


def list_metrics() -> list[str]:
    """Registered metric names, sorted, for CLIs and error messages."""
    return sorted(_METRICS)


def get_metric(name: str) -> Metric:
    """The metric registered as ``name``; unknown names fail loudly with the valid ones listed."""
    try:
        return _METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(list_metrics())}") from None
